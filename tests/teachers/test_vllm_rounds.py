"""An on-policy round on real vLLM: the student directory the trainer saved is served by vLLM from the teacher
environment, and the teacher's scores of its samples equal the transformers backend's for the same tokens."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import HFTeacherConfig
from pipeline.dataset.schema import read_manifest
from pipeline.generate import generate_dataset
from pipeline.rounds import round_dir, score_student_samples, student_of
from pipeline.teachers.hf import HFTeacher
from pipeline.train import train_student
from tests.helpers import needs_vllm, server_config

pytestmark = [pytest.mark.slow, needs_vllm]


def test_student_served_by_vllm_and_its_samples_scored_like_transformers(make_config, tiny_teacher):
    cfg = make_config(rounds=2, on_policy={"share": 0.5})
    generate_dataset(cfg, progress=False)  # round 0 through transformers: the test is about the round
    train_student(cfg, progress=False)
    served = server_config(tiny_teacher).model_dump(exclude={"model", "backend"})
    vcfg = make_config(
        rounds=2, on_policy={"share": 0.5}, teacher={"backend": "vllm_server", "model": str(tiny_teacher), **served}
    )
    sampled, scored = score_student_samples(vcfg, student_of(vcfg, 0), round_dir(vcfg, 1), r=1, heldout=False)

    own = read_manifest(sampled.dataset_dir)
    assert own.teacher.backend == "vllm_server" and own.teacher.model == str(student_of(cfg, 0))
    m = read_manifest(scored.dataset_dir)
    assert m.mode == "rescore" and m.teacher.backend == "vllm_server" and m.total_samples == own.total_samples > 0
    rows = [r for s in m.shards for r in pq.read_table(round_dir(vcfg, 1) / "dataset" / s.file).to_pylist()]
    reference = HFTeacher(HFTeacherConfig(model=str(tiny_teacher))).score(
        [r["prompt_token_ids"] for r in rows], [r["completion_token_ids"] for r in rows], k=m.k
    )
    tol = 2e-4 + 2 * m.storage.max_logprob_error  # stored on the logprob grid (a boundary value may round apart)
    for row, ref in zip(rows, reference, strict=True):
        assert row["topk_token_ids"] == ref.topk_token_ids.tolist()
        np.testing.assert_allclose(row["topk_logprobs"], ref.topk_logprobs, atol=tol)
        np.testing.assert_allclose(row["token_logprobs"], ref.token_logprobs, atol=tol)
