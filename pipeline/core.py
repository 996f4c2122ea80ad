"""The package's leaf: ids and hashes, crash-safe file writes, the held-out split rule, and the user-error class.

It imports nothing else of the package, so every layer may use it (docs/architecture.md).
"""

from __future__ import annotations

import errno
import hashlib
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa


class UserError(Exception):
    """A problem the user can fix (config, prompts, paths, datasets, servers, tokenizers), stated in one line.

    The CLI prints these as one `error:` line and the flow does not retry them; every other exception is a
    bug and keeps its traceback.
    """


class DiskFullError(UserError):
    """A write failed for lack of space or over a size limit; what was committed before it is kept."""


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def as_user_error(err: BaseException) -> UserError | None:
    """`err` as the user error it stands for (a full disk becomes DiskFullError); None for a bug."""
    if isinstance(err, UserError):
        return err
    if isinstance(err, OSError) and err.errno in _DISK_FULL:
        where = f" {err.filename}" if err.filename else " to disk"
        return DiskFullError(
            f"cannot write{where}: {os.strerror(err.errno)} (disk full or over a size limit); what was committed "
            "is kept: free some space and rerun the same command to resume"
        )
    return None


# ---- ids and hashes -------------------------------------------------------------------------------------------


def stable_id(*parts: object) -> str:
    """A short stable hash of `parts` (prompt, sample and shard ids, seeds, cache keys)."""
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


RUN_RECORDS = ("metrics.json", "train_log.json", "loss_curves.png")
"""Files distill writes beside a student's weights: a student directory served as a model (on-policy rounds)
keeps its identity when they are rewritten, as when its checkpoints/ change."""


def _run_record(root: Path, f: Path) -> bool:
    rel = f.relative_to(root).parts
    return rel[0] == "checkpoints" or (len(rel) == 1 and rel[0] in RUN_RECORDS)


def path_fingerprint(name: str) -> str:
    """Content fingerprint of a local file or model/prompts directory; '' for a hub id.

    Weight files count by name, size and their first MiB, so a retrained model at the same path is a new
    teacher without hashing gigabytes; everything else is hashed whole, except distill's own run records in a
    model directory (`RUN_RECORDS`, `checkpoints/`).
    """
    path = Path(name)
    if not path.exists():
        return ""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not _run_record(path, p))
    parts = []
    for f in files:
        heavy = f.suffix in (".safetensors", ".bin", ".pt", ".gguf") or f.stat().st_size > (64 << 20)
        with open(f, "rb") as fh:
            head = fh.read(1 << 20) if heavy else fh.read()
        name_in = str(f.relative_to(path)) if f != path else f.name
        parts.append((name_in, f.stat().st_size, hashlib.sha256(head).hexdigest()))
    return stable_id(*parts)


def looks_local(name: str) -> bool:
    """Whether a model/tokenizer name is meant as a local path rather than a hub id (`org/name`)."""
    return name.startswith((".", "/", "~")) or Path(name).parts[:1] == ("data",) or name.count("/") >= 2


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---- crash-safe writes ----------------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (the directory entry itself is fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half file behind
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)


# ---- the held-out split ---------------------------------------------------------------------------------------


def is_heldout(prompt_id: str, fraction: float) -> bool:
    """Deterministic split by prompt id: the same prompt is held out in every run and stage."""
    if fraction <= 0:
        return False
    return int(prompt_id[:8], 16) / 0x100000000 < fraction


_HEX = np.full(256, -1, dtype=np.int64)
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def heldout_mask(ids: pa.Array | pa.ChunkedArray, fraction: float) -> np.ndarray:
    """`is_heldout` for every id of a string column, vectorised over the ids' first 8 hex digits."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    if fraction <= 0 or len(ids) == 0:
        return np.zeros(len(ids), dtype=bool)
    if pa.types.is_string(ids.type) and ids.null_count == 0:
        offsets = np.frombuffer(ids.buffers()[1], np.int32)[ids.offset : ids.offset + len(ids) + 1]
        if (np.diff(offsets) >= 8).all():
            nibbles = _HEX[np.frombuffer(ids.buffers()[2], np.uint8)[offsets[:-1, None] + np.arange(8)]]
            if (nibbles >= 0).all():
                value = (nibbles << np.arange(28, -1, -4)).sum(axis=1)
                return value / 0x100000000 < fraction
    return np.fromiter((is_heldout(pid, fraction) for pid in ids.to_pylist()), bool, len(ids))  # ids it cannot parse
