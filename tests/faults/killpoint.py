"""Run the `distill` CLI with a real SIGKILL at a named point: `python killpoint.py [POINT N] [--fsize BYTES] -- ARGS`.

The patches live here, on the test side, and only decide *when* to die: the process then sends itself
SIGKILL, so no `finally`, atexit handler or flush runs, exactly as with `kill -9` from outside.

Points (N counts calls of that kind in this process, from 1):
  teacher_load      entering the teacher's constructor (HF, vLLM server or engine; nothing written yet)
  teacher_generate  entering the teacher's generate (the shard before it is committed)
  engine_busy       a shard's request is in the vLLM engine worker (backend vllm_engine), its answer not yet read
  shard_write       half of a shard's Parquet bytes are on disk under its temp name
  shard_renamed     a shard was renamed to its final name but is not yet in the manifest
  manifest_rename   a new manifest is written and fsynced under its temp name, not yet renamed
  checkpoint_write  a training checkpoint's weights are written in its temp dir, its optimizer state not yet
  round_pairs       an on-policy round's student samples are committed, the teacher has not started scoring them
`--stop` sends SIGSTOP instead, so a test can look at the live state and then `kill -9` from outside.
`--fsize BYTES` caps the size of any file this process writes (RLIMIT_FSIZE, SIGXFSZ ignored), so a
write past it fails with the OS error EFBIG, as on a full quota.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
from pathlib import Path

POINTS = (
    "teacher_load",
    "teacher_generate",
    "engine_busy",
    "shard_write",
    "shard_renamed",
    "manifest_rename",
    "checkpoint_write",
    "round_pairs",
)


ACTION = {"signal": signal.SIGKILL}


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), ACTION["signal"])


def install(point: str, nth: int) -> None:
    calls = {"n": 0}

    def due() -> bool:
        calls["n"] += 1
        return calls["n"] == nth

    if point in ("teacher_load", "teacher_generate"):
        from pipeline.teachers.hf import HFTeacher
        from pipeline.teachers.vllm_engine import VLLMEngineTeacher
        from pipeline.teachers.vllm_server import VLLMServerTeacher

        name = "__init__" if point == "teacher_load" else "generate"
        for cls in (HFTeacher, VLLMServerTeacher, VLLMEngineTeacher):

            def patched(self, *args, _original=getattr(cls, name), **kwargs):
                if due():
                    die()
                return _original(self, *args, **kwargs)

            setattr(cls, name, patched)
    elif point == "engine_busy":
        import time

        from pipeline.teachers.vllm_engine import EngineProcess

        original_receive = EngineProcess._receive

        def receive(self, deadline=None, starting=False):
            if not starting and due():
                time.sleep(0.5)  # the worker has read the request and is generating
                die()
            return original_receive(self, deadline, starting)

        EngineProcess._receive = receive
    elif point == "shard_write":
        import pyarrow.parquet as pq

        original_close = pq.ParquetWriter.close

        def close(self):  # every Parquet file is finished here (pq.write_table goes through it too)
            was_open = self.is_open
            original_close(self)
            if was_open and isinstance(self.where, (str, os.PathLike)) and due():
                path = Path(self.where)
                data = path.read_bytes()
                with open(path, "r+b") as f:
                    f.truncate(len(data) // 2)
                    f.flush()
                    os.fsync(f.fileno())
                die()

        pq.ParquetWriter.close = close
    elif point in ("shard_renamed", "manifest_rename"):
        original_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            name = Path(dst).name
            if point == "manifest_rename" and name == "manifest.json" and due():
                die()
            original_replace(src, dst, *args, **kwargs)
            if point == "shard_renamed" and name.endswith(".parquet") and due():
                die()

        os.replace = replace
    elif point == "checkpoint_write":
        import torch

        original_save = torch.save

        def save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and Path(f).name == "optimizer.pt" and due():
                die()
            return original_save(obj, f, *args, **kwargs)

        torch.save = save
    elif point == "round_pairs":
        import pipeline.rounds

        original_pairs = pipeline.rounds.write_pairs

        def write_pairs(*args, **kwargs):
            if due():
                die()
            return original_pairs(*args, **kwargs)

        pipeline.rounds.write_pairs = write_pairs
    else:
        raise SystemExit(f"unknown kill point {point!r}; choose from {', '.join(POINTS)}")


def main(argv: list[str]) -> None:
    split = argv.index("--")
    opts, cli_args = argv[:split], argv[split + 1 :]
    if "--fsize" in opts:
        i = opts.index("--fsize")
        limit = int(opts[i + 1])
        del opts[i : i + 2]
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    if "--stop" in opts:
        opts.remove("--stop")
        ACTION["signal"] = signal.SIGSTOP
    if opts:
        install(opts[0], int(opts[1]))
    from pipeline.cli import app

    sys.argv = ["distill", *cli_args]
    app()


if __name__ == "__main__":
    main(sys.argv[1:])
