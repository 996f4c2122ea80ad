"""On-policy rounds (pipeline/rounds.py) in process on the tiny teacher (transformers backend, no Prefect)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.core import is_heldout, path_fingerprint
from pipeline.dataset.schema import read_manifest
from pipeline.dataset.stream import TrainStream
from pipeline.dataset.validate import validate_dataset
from pipeline.evaluate import evaluate
from pipeline.generate import generate_dataset
from pipeline.models import load_tokenizer
from pipeline.rounds import round_dir, round_train_config, run_round, student_of
from pipeline.shards import load_prompts
from pipeline.train import train_student
from tests.helpers import refuse_teacher

pytestmark = pytest.mark.slow  # three trainings, two evaluations and four generate runs


def _rows(dataset) -> dict[str, dict]:
    m = read_manifest(dataset)
    return {r["sample_id"]: r for s in m.shards for r in pq.read_table(dataset / s.file).to_pylist()}


def test_a_round_samples_the_student_scores_it_trains_and_reruns_without_a_teacher(make_config, monkeypatch):
    cfg = make_config(rounds=2, on_policy={"share": 0.5, "steps": 4}, eval={"task": "demo", "max_prompts": 8})
    generate_dataset(cfg, progress=False)
    train_student(cfg, progress=False)
    evaluate(cfg)

    out = run_round(cfg, 1, ["generate", "train", "eval"])
    work = round_dir(cfg, 1)
    # the round's prompts: about half of the training prompts, none held out
    asked = [json.loads(line)["prompt"] for line in (work / "prompts.jsonl").read_text().splitlines()]
    _, prompts = load_prompts(cfg)
    train_prompts = [t for t, pid in zip(prompts.texts, prompts.ids) if not is_heldout(pid, 0.25)]
    assert set(asked) < set(train_prompts) and 0.25 < len(asked) / len(train_prompts) < 0.75

    # the round's dataset: the round-0 student's own samples, scored by the teacher, named in the manifest
    m = read_manifest(work / "dataset")
    assert m.mode == "rescore" and m.complete and m.total_samples == len(asked)
    assert m.completions.made_by == f"{cfg.student_dir} ({path_fingerprint(str(cfg.student_dir))})"
    assert validate_dataset(work / "dataset").complete
    sampled, scored = _rows(work / "samples" / "dataset"), _rows(work / "dataset")
    assert sampled.keys() == scored.keys()
    assert all(scored[s]["completion_token_ids"] == sampled[s]["completion_token_ids"] for s in sampled)

    # trained from round 0's student on its own data plus round 0's (earlier: all)
    rcfg = round_train_config(cfg, 1)
    assert rcfg.student.model == str(cfg.student_dir) and [x.path for x in rcfg.train.mix] == [str(cfg.dataset_dir)]
    assert out.trained and out.train.steps == 4 and (student_of(cfg, 1) / "model.safetensors").is_file()
    log = json.loads((student_of(cfg, 1) / "train_log.json").read_text())
    round0_train = TrainStream(cfg.dataset_dir, batch_size=8, pad_id=0).num_samples
    assert log["result"]["train_samples"] == len(scored) + round0_train

    # on-policy metrics: the mean of log p_student - log p_teacher over the student's held-out samples
    ev = round_dir(cfg, 1) / "eval"
    own, teacher = _rows(ev / "samples" / "dataset"), _rows(ev / "dataset")
    gap = np.concatenate([np.subtract(own[s]["token_logprobs"], teacher[s]["token_logprobs"]) for s in own])
    on_policy = out.metrics["on_policy"]
    assert on_policy["reverse_kl"] == pytest.approx(float(gap.mean()), abs=1e-9)
    assert on_policy["tokens"] == len(gap) and on_policy["samples"] == len(own) == 8
    from pipeline.demo.task import check

    tok = load_tokenizer(str(student_of(cfg, 1)))
    acc = np.mean(
        [check(r["prompt"], tok.decode(r["completion_token_ids"], skip_special_tokens=True)) for r in own.values()]
    )
    assert on_policy["accuracy"] == pytest.approx(acc)
    assert json.loads((work / "metrics.json").read_text())["round"] == 1

    # a rerun of the finished round keeps everything and starts no teacher or student model
    weights = (student_of(cfg, 1) / "model.safetensors").read_bytes()
    refuse_teacher(monkeypatch)
    again = run_round(cfg, 1, ["generate", "train", "eval"])
    assert not again.trained and again.dataset.cached and again.samples.cached
    assert (student_of(cfg, 1) / "model.safetensors").read_bytes() == weights
    assert again.metrics["on_policy"] == on_policy
