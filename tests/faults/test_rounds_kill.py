"""`kill -9` of `distill run` with `rounds: 3` in round 2, then the same command again: nothing of the killed run
keeps running (its local Prefect API included), finished rounds are kept (not retrained, their data not
regenerated), round 2 completes without duplicates or gaps, and a `--stages train` rerun loads no teacher or
student sampler."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from pipeline.core import sha256_file
from pipeline.dataset.schema import read_manifest
from pipeline.dataset.validate import validate_dataset
from tests.faults.harness import child_env, distill, write_config

pytestmark = pytest.mark.slow  # real `distill run` subprocesses

ROUNDS = {"rounds": 3, "on_policy": {"share": 0.6, "steps": 3}, "eval": {"task": "none", "max_prompts": 16}}
# student samples handed to the teacher, in order: round 0's on-policy eval (1), round 1's data (2), round 1's
# eval (3), round 2's data (4)
ROUND_2_SCORING = 4


def _marked(mark: str) -> list[int]:
    """Processes whose environment carries `mark` (everything a marked `distill` started)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"DISTILL_TEST_MARK={mark}".encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:  # gone, or not ours to read
            pass
    return found


def test_kill_in_round_2_then_rerun_keeps_finished_rounds(fault_raw, tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path / "cfg.yaml", {**fault_raw(out), **ROUNDS})
    env = child_env(DISTILL_TEST_MARK=tmp_path.name)
    res = distill("run", str(config), kill=("round_pairs", ROUND_2_SCORING), env=env, timeout=900)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    deadline = time.monotonic() + 30
    while _marked(tmp_path.name) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _marked(tmp_path.name), "the killed run left processes behind (its Prefect API?)"
    round1 = out / "rounds" / "1"
    assert (round1 / "round.json").is_file() and (round1 / "metrics.json").is_file()
    assert read_manifest(out / "rounds" / "2" / "samples" / "dataset").complete
    assert not (out / "rounds" / "2" / "dataset").exists(), "killed before the teacher scored round 2"
    kept = {p: sha256_file(p) for p in [round1 / "student" / "model.safetensors", round1 / "round.json"]}
    kept |= {p: sha256_file(p) for p in (round1 / "dataset" / "shards").iterdir()}

    res = distill("run", str(config), timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert {p: sha256_file(p) for p in kept} == kept, "round 1 was redone"
    round2 = out / "rounds" / "2"
    samples, scored = read_manifest(round2 / "samples" / "dataset"), read_manifest(round2 / "dataset")
    assert scored.complete and scored.total_samples == samples.total_samples
    assert validate_dataset(round2 / "dataset").complete
    metrics = json.loads((round2 / "metrics.json").read_text())
    assert metrics["round"] == 2 and metrics["on_policy"]["samples"] > 0
    assert (round2 / "student" / "model.safetensors").is_file()

    # retraining only the students: the first teacher (or student sampler) load would kill the process
    res = distill("run", str(config), "--stages", "train", kill=("teacher_load", 1), timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
