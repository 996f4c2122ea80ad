"""Training checkpoints: student weights, optimizer, RNG and data position, written atomically with checksums.

A checkpoint is a directory `checkpoints/step-0000500/` holding `model.safetensors` (the student's full,
unsharded weights under their HF names), `optimizer.pt` (the full optimizer state, keyed by parameter
name so that DDP, FSDP and single-process runs read each other's checkpoints), `rng.pt` and `state.json`.
The caller gathers both state dicts (pipeline/train/loop.py; under FSDP every rank takes part) and rank 0
writes them here. It is assembled in a `.tmp` directory and renamed into place once every
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
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.core import UserError, fsync_dir, sha256_file

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d{7,})$")
_FILES = ("model.safetensors", "optimizer.pt", "rng.pt")
AUX_FILE = "aux.safetensors"
AUX_PREFIX = "aux."
"""Weights under this prefix are trained beside the student but are not part of it (the live feature loss's
projections): checkpoints keep them in AUX_FILE, so model.safetensors stays the student's own file."""


class CheckpointMismatchError(UserError):
    """The checkpoints on disk were made by a run with other student/training settings."""


class _Damaged(Exception):
    """A checkpoint directory that fails its checks (resume falls back to the previous one)."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict


def checkpoint_root(student_dir: Path) -> Path:
    """Where a student's checkpoints live: `<student_dir>/checkpoints`."""
    return Path(student_dir) / CHECKPOINTS


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict,
    state: dict,
    keep: int,
    tied: dict[str, list[str]] | None = None,
) -> Path:
    """Write checkpoint `step` under `root` atomically, then delete all but the newest `keep`.

    `model_state`: the student's full weights; tied aliases (`pipeline.compat.tied_names`) are dropped as safetensors'
    save_model drops them, so the file is the one save_model(student) writes in a single process. Entries named
    `AUX_PREFIX...` go to AUX_FILE instead.
    `optimizer_state`: a full optimizer state dict.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f"step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    aliases = {alias: kept for kept, group in (tied or {}).items() for alias in group}
    aux = {k: v.contiguous() for k, v in model_state.items() if k.startswith(AUX_PREFIX)}
    save_file(
        {k: v.contiguous() for k, v in model_state.items() if k not in aliases and k not in aux},
        str(tmp / "model.safetensors"),
        metadata=aliases or None,
    )
    if aux:
        save_file(aux, str(tmp / AUX_FILE))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    torch.save(rng, tmp / "rng.pt")
    files = {}
    for name in _FILES + ((AUX_FILE,) if aux else ()):
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
    """state.json of a checkpoint whose files all match their checksums; raises _Damaged otherwise."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise _Damaged(f"state.json unreadable ({err})") from None
    for name, digest in state.get("files", {}).items():
        if not (path / name).is_file():
            raise _Damaged(f"{name} missing")
        if sha256_file(path / name) != digest:
            raise _Damaged(f"{name} fails its checksum")
    if set(state.get("files", {})) - {AUX_FILE} != set(_FILES):
        raise _Damaged("incomplete file list")
    return state


def latest_checkpoint(root: Path) -> Checkpoint | None:
    """The newest checkpoint that passes its checksums; damaged newer ones are reported and skipped."""
    for path in _step_dirs(root):
        try:
            state = _verify(path)
        except _Damaged as err:
            log.warning("checkpoint %s is damaged (%s); trying the previous one", path.name, err)
            continue
        return Checkpoint(path, int(state["step"]), state)
    return None


def _with_aliases(by_name: dict, tied: dict[str, list[str]] | None) -> dict:
    """`by_name` with each tied alias (dropped on save) mapped to the entry of the name it shares."""
    for kept, group in (tied or {}).items():
        for alias in group:
            if kept in by_name:
                by_name.setdefault(alias, by_name[kept])
    return by_name


def read_weights(ckpt: Checkpoint, tied: dict[str, list[str]] | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's full student weights, tied aliases filled in from the tensor they share."""
    return _with_aliases(load_file(str(ckpt.path / "model.safetensors")), tied)


def read_aux(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The checkpoint's weights trained beside the student (names start with AUX_PREFIX); {} when it has none."""
    path = ckpt.path / AUX_FILE
    return load_file(str(path)) if path.is_file() else {}


def weight_shapes(ckpt: Checkpoint, tied: dict[str, list[str]] | None = None) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the checkpoint's weights (tied aliases and AUX_FILE's included), from file headers only."""
    shapes = {}
    for name in ("model.safetensors", AUX_FILE):
        if (ckpt.path / name).is_file():
            with safe_open(str(ckpt.path / name), framework="pt") as fh:
                shapes.update({k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()})
    return _with_aliases(shapes, tied)


def read_optimizer(ckpt: Checkpoint) -> dict:
    """The checkpoint's full optimizer state dict, on CPU (tensors only: weights_only=True)."""
    return torch.load(ckpt.path / "optimizer.pt", map_location="cpu", weights_only=True)


def restore_rng(ckpt: Checkpoint) -> None:
    """Put the process's torch RNG (and CUDA's, same device count only) back where the checkpoint saved it."""
    rng = torch.load(ckpt.path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(rng["cuda"]))


def clear(root: Path) -> None:
    """Remove the checkpoints of an earlier run (a fresh, non-resumed run starts clean)."""
    shutil.rmtree(root, ignore_errors=True)
