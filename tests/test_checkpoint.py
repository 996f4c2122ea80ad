"""Training checkpoints on disk: atomic, checksummed, newest good one wins, tied weights stored once."""

import json

import pytest
import torch

from pipeline.checkpoint import (
    checkpoint_root,
    clear,
    latest_checkpoint,
    read_optimizer,
    read_weights,
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


@pytest.mark.parametrize("damage", ["flip a byte", "delete a file", "drop a file from the list"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog, damage):
    root = checkpoint_root(tmp_path / "student")
    _save(root, 4, _Tied())
    newest = _save(root, 8, _Tied())
    if damage == "flip a byte":
        data = bytearray((newest / "model.safetensors").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (newest / "model.safetensors").write_bytes(bytes(data))
    elif damage == "delete a file":
        (newest / "rng.pt").unlink()
    else:
        state = json.loads((newest / "state.json").read_text())
        del state["files"]["optimizer.pt"]
        (newest / "state.json").write_text(json.dumps(state))
    assert latest_checkpoint(root).step == 4
    assert "step-0000008 is damaged" in caplog.text
