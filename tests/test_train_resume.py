"""Checkpoints and --resume: an interrupted run resumed equals an uninterrupted one; damaged checkpoints fall back
(tests/test_checkpoint.py tests the checkpoint files themselves).

Also: gradient checkpointing changes memory, not the numbers; two DDP or FSDP2 processes (gloo, CPU)
equal one process with twice the gradient accumulation, and FSDP checkpoints resume.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import pipeline.train.loop as train_loop
from pipeline.checkpoint import CheckpointMismatchError, checkpoint_root, latest_checkpoint
from pipeline.train import train_student
from tests.helpers import FSDP_ENV, TORCHRUN, train_cli


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
    real = train_loop.save_checkpoint

    def save_then_stop(root, step, **kw):
        path = real(root, step, **kw)
        if step == stop_step:
            raise Interrupted(step)
        return path

    monkeypatch.setattr(train_loop, "save_checkpoint", save_then_stop)


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


def test_resume_refuses_checkpoints_of_another_config(reference, tmp_path, monkeypatch):
    cfg, _, _ = reference
    out = tmp_path / "student"
    _interrupt_after(monkeypatch, 4)
    with pytest.raises(Interrupted):
        train_student(cfg, student_dir=out, progress=False)
    monkeypatch.undo()
    with pytest.raises(CheckpointMismatchError, match="other student/training settings"):
        train_student(_with_train(cfg, lr=1e-3), student_dir=out, progress=False, resume=True)
    # operational settings may change between the runs, the memory ones too (a run that ran out of memory)
    resumed = _with_train(cfg, log_every=5, keep_checkpoints=3, loss_chunk_size=7, gradient_checkpointing=True)
    res = train_student(resumed, student_dir=out, progress=False, resume=True)
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


def _history(student_dir: Path) -> list[dict]:
    return json.loads((student_dir / "train_log.json").read_text())["history"]


@pytest.fixture(scope="module")
def one_process(generated, tmp_path_factory):
    """The reference for the 2-process runs: 4 steps of one process with grad_accum 2, a checkpoint at step 2.

    Returns (the base raw config, the student directory).
    """
    base = generated.model_dump(mode="json")
    base["train"].update(max_steps=4, batch_size=8, checkpoint_every=2, device="cpu")
    tmp = tmp_path_factory.mktemp("one")
    one = {**base, "output_dir": str(tmp), "train": {**base["train"], "grad_accum": 2}}
    (tmp / "one.yaml").write_text(yaml.safe_dump(one))
    train_cli(tmp / "one.yaml", str(generated.dataset_dir))
    return base, tmp / "student"


def _two_processes_vs_one(one_process, dataset: Path, tmp_path, env=None, device="cpu") -> tuple[Path, Path, Path]:
    """Two processes (gloo, CPU) with grad_accum 1, the same global batch as `one_process`: same numbers.

    Returns (the one-process student directory, the two-process one, the two-process config).
    """
    base, one_dir = one_process
    two = {**base, "output_dir": str(tmp_path / "two"), "train": {**base["train"], "grad_accum": 1, "device": device}}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(two))
    train_cli(tmp_path / "two.yaml", str(dataset), launcher=TORCHRUN, env=env)
    two_dir = tmp_path / "two" / "student"
    _assert_same_weights(two_dir, one_dir, atol=1e-5)
    assert [h["loss"] for h in _history(two_dir)] == pytest.approx([h["loss"] for h in _history(one_dir)], rel=1e-5)
    assert sorted(p.name for p in checkpoint_root(two_dir).iterdir()) == ["step-0000002"]
    return one_dir, two_dir, tmp_path / "two.yaml"


@pytest.mark.slow
def test_two_ddp_processes_equal_one_process_with_double_accumulation(one_process, generated, tmp_path):
    """`torchrun --nproc_per_node 2` (gloo on CPU) runs the same CLI; rank r takes micro-batches r, r+2, ..."""
    # `device: auto` on a machine without a GPU: the processes must still form one gloo group, not train alone
    device = "cpu" if torch.cuda.is_available() else "auto"
    _, two, _ = _two_processes_vs_one(one_process, generated.dataset_dir, tmp_path, device=device)
    assert json.loads((two / "train_log.json").read_text())["distributed"]["type"] == "MULTI_CPU"


@pytest.mark.slow
def test_two_fsdp_processes_equal_one_process_and_resume(one_process, generated, tmp_path):
    """FSDP2 through accelerate's environment (gloo on CPU): same numbers as one process, a normal HF
    student directory, full-state checkpoints, and a resume from the step-2 checkpoint that ends the same."""
    from transformers import AutoModelForCausalLM

    one, two, two_yaml = _two_processes_vs_one(one_process, generated.dataset_dir, tmp_path, env=FSDP_ENV)
    assert json.loads((two / "train_log.json").read_text())["distributed"] == {
        "type": "FSDP",
        "processes": 2,
        "fsdp_version": 2,
    }
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert json.loads((two / "config.json").read_text()) == json.loads((one / "config.json").read_text())
    student = AutoModelForCausalLM.from_pretrained(two)
    ref = _weights(one)
    for name, tensor in student.state_dict().items():
        torch.testing.assert_close(tensor, ref[name], rtol=0, atol=1e-5, msg=name)
    # the checkpoint holds full tensors under the student's names, as a single process writes them
    step2 = checkpoint_root(two) / "step-0000002"
    assert {k: v.shape for k, v in load_file(str(step2 / "model.safetensors")).items()} == {
        k: v.shape for k, v in load_file(str(checkpoint_root(one) / "step-0000002" / "model.safetensors")).items()
    }
    optim = torch.load(step2 / "optimizer.pt", weights_only=True)
    assert set(optim["state"]) == set(ref)
    assert optim["state"]["lm_head.weight"]["exp_avg"].shape == ref["lm_head.weight"].shape

    # resume: the final student is gone, training continues from step 2 and ends as before
    final = _weights(two)
    (two / "model.safetensors").unlink()
    done = train_cli(two_yaml, str(generated.dataset_dir), launcher=TORCHRUN, env=FSDP_ENV, resume=True)
    assert "resumed from the checkpoint at step 2" in done.stdout + done.stderr
    resumed = _weights(two)
    for name in final:
        torch.testing.assert_close(resumed[name], final[name], rtol=0, atol=1e-6, msg=name)
    assert [h["step"] for h in _history(two)] == [1, 2, 3, 4]
    assert [h["loss"] for h in _history(two)] == pytest.approx([h["loss"] for h in _history(one)], rel=1e-5)
