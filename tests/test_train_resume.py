"""Checkpoints and --resume: an interrupted run resumed equals an uninterrupted one; damaged checkpoints fall back.

Also: gradient checkpointing changes memory, not the numbers; two DDP processes (gloo, CPU) equal one
process with twice the gradient accumulation.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import pipeline.train as train_mod
from pipeline.checkpoint import CheckpointMismatchError, checkpoint_root, latest_checkpoint
from pipeline.train import train_student


class Interrupted(Exception):
    pass


def _with_train(cfg, **train):
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=train)})


def _weights(student_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(student_dir / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=atol, msg=name)


def _interrupt_after(monkeypatch, stop_step: int) -> None:
    """Save checkpoints as usual, then stop the run right after checkpoint `stop_step` (a crash stand-in)."""
    real = train_mod.save_checkpoint

    def save_then_stop(root, step, **kw):
        path = real(root, step, **kw)
        if step == stop_step:
            raise Interrupted(step)
        return path

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_stop)


@pytest.fixture(scope="module")
def reference(generated, tmp_path_factory):
    """An uninterrupted 12-step run that checkpoints every 4 steps."""
    cfg = _with_train(generated, max_steps=12, checkpoint_every=4, batch_size=8, grad_accum=2)
    out = tmp_path_factory.mktemp("ref") / "student"
    res = train_student(cfg, student_dir=out, progress=False)
    return cfg, out, res


def test_resume_equals_uninterrupted_run(reference, tmp_path, monkeypatch):
    cfg, ref_dir, ref = reference
    out = tmp_path / "student"
    _interrupt_after(monkeypatch, 8)
    with pytest.raises(Interrupted):
        train_student(cfg, student_dir=out, progress=False)
    assert not (out / "model.safetensors").exists()
    assert sorted(p.name for p in checkpoint_root(out).iterdir()) == ["step-0000004", "step-0000008"]
    monkeypatch.undo()
    res = train_student(cfg, student_dir=out, progress=False, resume=True)
    assert res.resumed_from_step == 8 and res.steps == 12
    assert res.final_loss == pytest.approx(ref.final_loss, rel=1e-6, abs=1e-7)
    _assert_same_weights(out, ref_dir, atol=1e-6)
    hist = json.loads((out / "train_log.json").read_text())["history"]
    ref_hist = json.loads((ref_dir / "train_log.json").read_text())["history"]
    assert [h["step"] for h in hist] == [h["step"] for h in ref_hist]  # no gaps, no duplicate steps
    assert [h["loss"] for h in hist] == pytest.approx([h["loss"] for h in ref_hist], rel=1e-6)


def test_damaged_newest_checkpoint_falls_back_to_the_previous(reference, tmp_path, monkeypatch, caplog):
    cfg, ref_dir, ref = reference
    out = tmp_path / "student"
    _interrupt_after(monkeypatch, 8)
    with pytest.raises(Interrupted):
        train_student(cfg, student_dir=out, progress=False)
    monkeypatch.undo()
    newest = checkpoint_root(out) / "step-0000008" / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    assert latest_checkpoint(checkpoint_root(out)).step == 4
    assert "step-0000008 is damaged (model.safetensors fails its checksum)" in caplog.text
    res = train_student(cfg, student_dir=out, progress=False, resume=True)
    assert res.resumed_from_step == 4
    assert res.final_loss == pytest.approx(ref.final_loss, rel=1e-6, abs=1e-7)
    _assert_same_weights(out, ref_dir, atol=1e-6)


def test_half_written_checkpoint_is_ignored(reference, tmp_path, monkeypatch):
    """A kill during a save leaves a .tmp dir (never renamed into place) or a state.json that does not parse."""
    cfg, _, _ = reference
    out = tmp_path / "student"
    _interrupt_after(monkeypatch, 4)
    with pytest.raises(Interrupted):
        train_student(cfg, student_dir=out, progress=False)
    monkeypatch.undo()
    root = checkpoint_root(out)
    (root / "step-0000008.tmp").mkdir()
    (root / "step-0000008.tmp" / "model.safetensors").write_bytes(b"partial")
    (root / "step-0000012").mkdir()
    (root / "step-0000012" / "state.json").write_text('{"step": 12, "fi')
    assert latest_checkpoint(root).step == 4


def test_resume_refuses_checkpoints_of_another_config(reference, tmp_path, monkeypatch):
    cfg, _, _ = reference
    out = tmp_path / "student"
    _interrupt_after(monkeypatch, 4)
    with pytest.raises(Interrupted):
        train_student(cfg, student_dir=out, progress=False)
    monkeypatch.undo()
    with pytest.raises(CheckpointMismatchError, match="other student/training settings"):
        train_student(_with_train(cfg, lr=1e-3), student_dir=out, progress=False, resume=True)
    # operational settings may change between the runs
    res = train_student(_with_train(cfg, log_every=5, keep_checkpoints=3), student_dir=out, progress=False, resume=True)
    assert res.resumed_from_step == 4


def test_resume_without_checkpoints_starts_fresh_and_a_fresh_run_clears_old_ones(generated, tmp_path):
    cfg = _with_train(generated, max_steps=4, checkpoint_every=2)
    out = tmp_path / "student"
    res = train_student(cfg, student_dir=out, progress=False, resume=True)
    assert res.resumed_from_step == 0
    assert [p.name for p in checkpoint_root(out).iterdir()] == ["step-0000002"]
    train_student(_with_train(cfg, max_steps=3, checkpoint_every=0), student_dir=out, progress=False)
    assert not checkpoint_root(out).exists()


def test_gradient_checkpointing_gives_the_same_numbers(generated, tmp_path):
    cfg = _with_train(generated, max_steps=3, checkpoint_every=0)
    plain = train_student(cfg, student_dir=tmp_path / "plain", progress=False)
    gc = train_student(_with_train(cfg, gradient_checkpointing=True), student_dir=tmp_path / "gc", progress=False)
    assert gc.final_loss == pytest.approx(plain.final_loss, rel=1e-5)
    _assert_same_weights(tmp_path / "gc", tmp_path / "plain", atol=1e-5)


def test_two_ddp_processes_equal_one_process_with_double_accumulation(generated, tmp_path):
    """`torchrun --nproc_per_node 2` (gloo on CPU) runs the same CLI; rank r takes micro-batches r, r+2, ..."""
    base = generated.model_dump(mode="json")
    base["train"].update(max_steps=4, batch_size=8, checkpoint_every=2, device="cpu")
    one = {**base, "output_dir": str(tmp_path / "one"), "train": {**base["train"], "grad_accum": 2}}
    two = {**base, "output_dir": str(tmp_path / "two"), "train": {**base["train"], "grad_accum": 1}}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for name, raw in (("one", one), ("two", two)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    dataset = str(generated.dataset_dir)
    single = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", str(tmp_path / "one.yaml"), "--dataset", dataset],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    ddp = subprocess.run([*torchrun, "-m", "pipeline.cli", "train", str(tmp_path / "two.yaml"), "--dataset", dataset],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    _assert_same_weights(tmp_path / "two" / "student", tmp_path / "one" / "student", atol=1e-5)
    log_one = json.loads((tmp_path / "one/student/train_log.json").read_text())["history"]
    log_two = json.loads((tmp_path / "two/student/train_log.json").read_text())["history"]
    assert [h["loss"] for h in log_two] == pytest.approx([h["loss"] for h in log_one], rel=1e-5)
    assert sorted(p.name for p in checkpoint_root(tmp_path / "two/student").iterdir()) == ["step-0000002"]
