"""Helpers for the fault tests: run `distill` in a real subprocess (optionally through killpoint.py) and look at
what it left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline.core import sha256_file
from pipeline.dataset.schema import MANIFEST
from tests.helpers import write_config  # noqa: F401  (re-exported for the fault tests)

ROOT = Path(__file__).resolve().parents[2]
KILLPOINT = Path(__file__).with_name("killpoint.py")


def child_env(**extra: str) -> dict:
    """Offline, one thread per process (two cores are shared by everything here), deterministic."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONUNBUFFERED": "1",
        "COLUMNS": "250",
    }
    env.update(extra)
    return env


def _options(kill: tuple[str, int] | None, fsize: int | None, stop: bool = False) -> list[str]:
    return [
        *(map(str, kill) if kill else []),
        *(["--fsize", str(fsize)] if fsize else []),
        *(["--stop"] if stop else []),
    ]


def distill(
    *args: str,
    kill: tuple[str, int] | None = None,
    fsize: int | None = None,
    env: dict | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """`distill ARGS` as a real process; `kill=(point, n)` dies by SIGKILL there, `fsize` caps file sizes."""
    cmd = [sys.executable, str(KILLPOINT), *_options(kill, fsize), "--", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env or child_env(), capture_output=True, text=True, timeout=timeout)


def start_distill(
    *args: str, log: Path, env: dict | None = None, stop_at: tuple[str, int] | None = None
) -> subprocess.Popen:
    """`distill ARGS` in the background, output to `log`; `stop_at=(point, n)` freezes it there (SIGSTOP)."""
    out = open(log, "wb")
    try:
        return subprocess.Popen(
            [sys.executable, str(KILLPOINT), *_options(stop_at, None, stop=bool(stop_at)), "--", *args],
            cwd=ROOT,
            env=env or child_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    finally:
        out.close()


def process_state(pid: int) -> str:
    """One-letter state from /proc (R, S, T for stopped, Z ...), '' when gone."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def listed_shards(dataset_dir: Path) -> dict[str, str]:
    """{file name: sha256} of the shards the manifest lists (the ones that count)."""
    manifest = json.loads((dataset_dir / MANIFEST).read_text())
    return {Path(s["file"]).name: sha256_file(dataset_dir / s["file"]) for s in manifest["shards"]}


def files_on_disk(dataset_dir: Path) -> set[str]:
    return {str(p.relative_to(dataset_dir)) for p in dataset_dir.rglob("*") if p.is_file()}


def processes_mentioning(marker: str) -> list[int]:
    """Live processes whose command line or environment holds `marker` (a unique tmp path)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            blob = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in blob and int(proc.name) != os.getpid():
            found.append(int(proc.name))
    return found


def wait_until(predicate, timeout: float, every: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return bool(predicate())


def copy_first_shards(reference: Path, dataset_dir: Path, keep: int) -> dict[str, str]:
    """A copy of `reference` as a run killed after committing `keep` shards leaves it; returns those shards' sha256."""
    import shutil

    shutil.copytree(reference, dataset_dir)
    raw = json.loads((dataset_dir / MANIFEST).read_text())
    for shard in raw["shards"][keep:]:
        (dataset_dir / shard["file"]).unlink()
    raw["shards"] = raw["shards"][:keep]
    raw["complete"] = False
    raw["total_samples"] = sum(s["rows"] for s in raw["shards"])
    raw["total_tokens"] = sum(s["tokens"] for s in raw["shards"])
    (dataset_dir / MANIFEST).write_text(json.dumps(raw, indent=2))
    return listed_shards(dataset_dir)


def one_error_line(res: subprocess.CompletedProcess, fragment: str) -> str:
    """Assert exit 1 with a single `error:` line holding `fragment` and no traceback; return the line."""
    out = res.stdout + res.stderr
    assert res.returncode == 1, f"exit {res.returncode}:\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), out[-3000:]
    assert fragment in lines[0], lines[0]
    return lines[0]
