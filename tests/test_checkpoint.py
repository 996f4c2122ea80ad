"""Training checkpoints on disk: atomic, checksummed, newest good one wins, tied weights stored once."""

import json
import pickle

import pytest
import torch

from pipeline.checkpoint import (
    AUX_FILE,
    AUX_PREFIX,
    checkpoint_root,
    clear,
    latest_checkpoint,
    read_aux,
    read_optimizer,
    read_weights,
    restore_rng,
    save_checkpoint,
    weight_shapes,
)
from pipeline.compat import tied_names


class _Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3)
        self.head = torch.nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight


def _save(root, step, model, keep=2):
    opt = {"state": {"head.weight": {"step": torch.tensor(float(step))}}, "param_groups": [{"params": ["head.weight"]}]}
    return save_checkpoint(
        root,
        step,
        model_state=model.state_dict(),
        optimizer_state=opt,
        tied=tied_names(model),
        keep=keep,
        state={"fingerprint": "f", "data": {"epoch": 0, "batch": step}},
    )


def test_round_trip_keeps_the_newest_and_stores_tied_weights_once(tmp_path):
    model, root = _Tied(), checkpoint_root(tmp_path / "student")
    assert tied_names(model) == {"embed.weight": ["head.weight"]}
    for step in (2, 4, 6):
        _save(root, step, model)
    assert sorted(p.name for p in root.iterdir()) == ["step-0000004", "step-0000006"]  # keep=2
    ckpt = latest_checkpoint(root)
    assert ckpt.step == 6 and ckpt.state["data"] == {"epoch": 0, "batch": 6} and ckpt.state["fingerprint"] == "f"
    from safetensors.torch import load_file

    assert set(load_file(str(ckpt.path / "model.safetensors"))) == {"embed.weight"}  # the alias is not stored
    weights = read_weights(ckpt, tied_names(model))
    assert set(weights) == {"embed.weight", "head.weight"} and torch.equal(weights["head.weight"], model.embed.weight)
    assert weight_shapes(ckpt, tied_names(model)) == {"embed.weight": (5, 3), "head.weight": (5, 3)}
    assert read_optimizer(ckpt)["state"]["head.weight"]["step"].item() == 6
    clear(root)
    assert not root.exists() and latest_checkpoint(root) is None


def test_half_written_checkpoint_is_ignored(tmp_path):
    """A kill during a save leaves a .tmp dir (never renamed into place) or a state.json that does not parse.
    (Moved from tests/test_train_resume.py, with the checkpoint written directly instead of by a training run.)"""
    root = checkpoint_root(tmp_path / "student")
    _save(root, 4, _Tied())
    (root / "step-0000008.tmp").mkdir()
    (root / "step-0000008.tmp" / "model.safetensors").write_bytes(b"partial")
    (root / "step-0000012").mkdir()
    (root / "step-0000012" / "state.json").write_text('{"step": 12, "fi')
    assert latest_checkpoint(root).step == 4


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("flip a byte", "model.safetensors fails its checksum"),
        ("delete a file", "rng.pt missing"),
        ("drop a file from the list", "incomplete file list"),
        ("no file list", "incomplete file list"),
        ("state.json cut short", "state.json unreadable (Unterminated string"),
    ],
)
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog, damage, reason):
    root = checkpoint_root(tmp_path / "student")
    _save(root, 4, _Tied())
    newest = _save(root, 8, _Tied())
    state = json.loads((newest / "state.json").read_text())
    if damage == "flip a byte":
        data = bytearray((newest / "model.safetensors").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (newest / "model.safetensors").write_bytes(bytes(data))
    elif damage == "delete a file":
        (newest / "rng.pt").unlink()
    elif damage == "drop a file from the list":
        del state["files"]["optimizer.pt"]
        (newest / "state.json").write_text(json.dumps(state))
    elif damage == "no file list":
        del state["files"]
        (newest / "state.json").write_text(json.dumps(state))
    else:
        (newest / "state.json").write_text('{"step": 8, "fi')
    assert latest_checkpoint(root).step == 4
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith(f"checkpoint step-0000008 is damaged ({reason}")
    assert message.endswith("); trying the previous one")


def test_state_json_and_the_tied_alias_record_are_what_a_user_reads(tmp_path):
    """state.json is indented JSON with the caller's state, the step and each file's sha256; model.safetensors
    names each dropped tied alias in its metadata, as safetensors' save_model writes it."""
    from safetensors import safe_open

    from pipeline.core import sha256_file

    path = _save(checkpoint_root(tmp_path / "student"), 5, _Tied())
    files = {name: sha256_file(path / name) for name in ("model.safetensors", "optimizer.pt", "rng.pt")}
    state = {"fingerprint": "f", "data": {"epoch": 0, "batch": 5}, "step": 5, "files": files}
    assert (path / "state.json").read_text() == json.dumps(state, indent=1)
    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        assert fh.metadata() == {"head.weight": "embed.weight"}


def test_a_save_over_a_killed_save_or_an_older_run_of_the_same_step_replaces_it(tmp_path):
    root = checkpoint_root(tmp_path / "student")
    (root / "step-0000004.tmp").mkdir(parents=True)  # a save killed half way
    (root / "step-0000004.tmp" / "model.safetensors").write_bytes(b"partial")
    first = _save(root, 4, _Tied())
    assert not (root / "step-0000004.tmp").exists() and latest_checkpoint(root).step == 4
    (first / "stale-file").write_text("from the run before the resume")
    again = _save(root, 4, _Tied())  # resumed from an older checkpoint, step 4 is saved again
    assert again == first and not (again / "stale-file").exists() and latest_checkpoint(root).path == again


def test_weights_trained_beside_the_student_go_to_their_own_file(tmp_path):
    """Projections of the live feature loss (`aux.` names) are kept apart: model.safetensors stays the student's."""
    from safetensors.torch import load_file

    model, root = _Tied(), checkpoint_root(tmp_path / "student")
    proj = torch.arange(6.0).reshape(2, 3)
    state = {**model.state_dict(), f"{AUX_PREFIX}proj.weight": proj}
    tied = tied_names(model)
    ckpt_dir = save_checkpoint(root, 3, model_state=state, optimizer_state={}, state={}, keep=1, tied=tied)
    ckpt = latest_checkpoint(root)
    assert ckpt.path == ckpt_dir and set(ckpt.state["files"]) == {
        "model.safetensors",
        "optimizer.pt",
        "rng.pt",
        AUX_FILE,
    }
    assert set(load_file(str(ckpt_dir / "model.safetensors"))) == {"embed.weight"}
    aux = read_aux(ckpt)
    assert list(aux) == [f"{AUX_PREFIX}proj.weight"] and torch.equal(aux[f"{AUX_PREFIX}proj.weight"], proj)
    assert weight_shapes(ckpt)[f"{AUX_PREFIX}proj.weight"] == (2, 3)
    plain = save_checkpoint(root, 4, model_state=model.state_dict(), optimizer_state={}, state={}, keep=1, tied=tied)
    assert read_aux(latest_checkpoint(root)) == {} and not (plain / AUX_FILE).exists()


class _NotATensor:
    pass


def test_optimizer_and_rng_files_are_read_as_data_never_as_code(tmp_path):
    """A checkpoint directory is user input: `torch.load` runs it with weights_only, so a pickled object is refused."""
    root = checkpoint_root(tmp_path / "student")
    _save(root, 2, _Tied())
    ckpt = latest_checkpoint(root)
    torch.save({"state": {}, "param_groups": [], "extra": _NotATensor()}, ckpt.path / "optimizer.pt")
    with pytest.raises(pickle.UnpicklingError):
        read_optimizer(ckpt)
    torch.save({"cpu": torch.get_rng_state(), "extra": _NotATensor()}, ckpt.path / "rng.pt")
    with pytest.raises(pickle.UnpicklingError):
        restore_rng(ckpt)


def test_rng_state_comes_back_and_a_gpu_checkpoint_resumes_on_a_cpu_machine(tmp_path):
    root = checkpoint_root(tmp_path / "student")
    torch.manual_seed(7)
    _save(root, 2, _Tied())
    expected = torch.rand(4)
    ckpt = latest_checkpoint(root)
    restore_rng(ckpt)
    assert torch.equal(torch.rand(4), expected)
    rng = torch.load(ckpt.path / "rng.pt", weights_only=True)
    rng["cuda"] = torch.zeros(2, 16, dtype=torch.uint8)  # as saved on a 2-GPU machine
    torch.save(rng, ckpt.path / "rng.pt")
    if torch.cuda.device_count() == 2:
        pytest.skip("this test is about a machine with another GPU count than the one that saved")
    torch.rand(3)
    restore_rng(ckpt)  # the CPU generator comes back; the CUDA states are not for this machine and are left
    assert torch.equal(torch.rand(4), expected)
