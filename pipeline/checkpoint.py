"""Training checkpoints: student weights, optimizer, RNG and data position, written atomically with checksums.

A checkpoint is a directory `checkpoints/step-0000500/` holding `model.safetensors`, `optimizer.pt`,
`rng.pt` and `state.json`. It is assembled in a `.tmp` directory and renamed into place once every
file is on disk, and `state.json` lists each file's sha256, so a kill mid-save or a damaged file is
detected on resume and the previous good checkpoint is used instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from pipeline.dataset.schema import sha256_file
from pipeline.dataset.writer import fsync_dir

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d{7,})$")
_FILES = ("model.safetensors", "optimizer.pt", "rng.pt")


class CheckpointMismatchError(ValueError):
    """The checkpoints on disk were made by a run with other student/training settings."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict


def checkpoint_root(student_dir: Path) -> Path:
    return Path(student_dir) / CHECKPOINTS


def save_checkpoint(root: Path, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, keep: int) -> Path:
    """Write checkpoint `step` under `root` atomically, then delete all but the newest `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f"step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))  # handles tied weights (shared storage)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    torch.save(rng, tmp / "rng.pt")
    files = {}
    for name in _FILES:
        with open(tmp / name, "rb") as fh:
            os.fsync(fh.fileno())
        files[name] = sha256_file(tmp / name)
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "files": files}, indent=1))
    with open(tmp / "state.json", "rb") as fh:
        os.fsync(fh.fileno())
    if final.exists():  # a step saved again after a resume from an older checkpoint
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    for old in _step_dirs(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _step_dirs(root: Path) -> list[Path]:
    """Completed checkpoint directories, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def _verify(path: Path) -> dict:
    """state.json of a checkpoint whose files all match their checksums; raises ValueError otherwise."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"state.json unreadable ({err})") from None
    for name, digest in state.get("files", {}).items():
        if not (path / name).is_file():
            raise ValueError(f"{name} missing")
        if sha256_file(path / name) != digest:
            raise ValueError(f"{name} fails its checksum")
    if set(state.get("files", {})) != set(_FILES):
        raise ValueError("incomplete file list")
    return state


def latest_checkpoint(root: Path) -> Checkpoint | None:
    """The newest checkpoint that passes its checksums; damaged newer ones are reported and skipped."""
    for path in _step_dirs(root):
        try:
            state = _verify(path)
        except ValueError as err:
            log.warning("checkpoint %s is damaged (%s); trying the previous one", path.name, err)
            continue
        return Checkpoint(path, int(state["step"]), state)
    return None


def restore(ckpt: Checkpoint, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load weights, optimizer state and RNG from a verified checkpoint (tensors only: weights_only=True)."""
    try:
        load_model(model, str(ckpt.path / "model.safetensors"), strict=True)  # tied weights are matched by safetensors
    except RuntimeError as err:
        raise CheckpointMismatchError(f"{ckpt.path} does not fit this student: {str(err).splitlines()[0]}") from None
    device = next(model.parameters()).device
    optimizer.load_state_dict(torch.load(ckpt.path / "optimizer.pt", map_location=device, weights_only=True))
    rng = torch.load(ckpt.path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(rng["cuda"]))


def clear(root: Path) -> None:
    """Remove the checkpoints of an earlier run (a fresh, non-resumed run starts clean)."""
    shutil.rmtree(root, ignore_errors=True)
