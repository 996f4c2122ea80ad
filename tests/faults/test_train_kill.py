"""`kill -9` of `distill train`, then `--resume`: same final loss as an uninterrupted run; damaged checkpoints
are skipped.

Real processes throughout: the kill lands in the middle of writing the third checkpoint (weights on
disk, optimizer state not yet), so a partial checkpoint is left beside two good ones.
"""

from __future__ import annotations

import json
import shutil
import signal

import pytest

from tests.faults.harness import distill, write_config

pytestmark = pytest.mark.slow  # real `distill` subprocesses

TRAIN = {"max_steps": 12, "checkpoint_every": 3, "keep_checkpoints": 2, "log_every": 1}


def _final_loss(student_dir) -> float:
    return json.loads((student_dir / "train_log.json").read_text())["result"]["final_loss"]


def _setup(fault_raw, reference, out):
    shutil.copytree(reference, out / "dataset")
    return write_config(out.parent / f"{out.name}.yaml", fault_raw(out, train=TRAIN))


def test_kill_9_mid_checkpoint_then_resume_matches_an_uninterrupted_run(fault_raw, reference, tmp_path):
    plain = _setup(fault_raw, reference, tmp_path / "plain")
    res = distill("train", str(plain))
    assert res.returncode == 0, res.stderr[-3000:]
    expected = _final_loss(tmp_path / "plain/student")

    config = _setup(fault_raw, reference, tmp_path / "run")
    ckpts = tmp_path / "run/student/checkpoints"
    res = distill("train", str(config), kill=("checkpoint_write", 3))
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000003", "step-0000006", "step-0000009.tmp"]
    assert not (tmp_path / "run/student/model.safetensors").exists()

    res = distill("train", str(config), "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from the checkpoint at step 6" in res.stdout, res.stdout
    assert abs(_final_loss(tmp_path / "run/student") - expected) < 1e-5
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000006", "step-0000009"]

    # A truncated newest checkpoint is detected by its checksum and the previous good one is used.
    weights = ckpts / "step-0000009/model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    res = distill("train", str(config), "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from the checkpoint at step 6" in res.stdout, res.stdout
    assert "step-0000009 is damaged" in res.stderr, res.stderr[-2000:]
    assert abs(_final_loss(tmp_path / "run/student") - expected) < 1e-5
