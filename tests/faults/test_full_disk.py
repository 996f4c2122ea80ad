"""A full disk while `distill generate` writes a shard: one clear line, exit 1, earlier shards intact, rerun resumes.

Two real faults: a size-limited tmpfs filled to one free page (needs root and mount rights; skipped
where the sandbox refuses), and, everywhere, RLIMIT_FSIZE on the child process, which makes the OS
refuse the shard write with EFBIG like a quota would.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pipeline.dataset.schema import MANIFEST
from pipeline.dataset.validate import validate_dataset
from tests.faults.harness import copy_first_shards, distill, files_on_disk, listed_shards, one_error_line, write_config

pytestmark = pytest.mark.slow  # real `distill` subprocesses

PAGE = 4096


def _check_fault_then_rerun(
    config: Path, dataset: Path, kept: dict[str, str], reference: Path, res, fragment: str, free_space=lambda: None
) -> None:
    one_error_line(res, fragment)
    assert listed_shards(dataset) == kept, "the shards committed before the disk filled changed"
    assert files_on_disk(dataset) == {MANIFEST, *(f"shards/{n}" for n in kept)}, "the failed write left files behind"
    report = validate_dataset(dataset)
    assert report.shards == 2 and not report.complete
    free_space()
    again = distill("generate", str(config))
    assert again.returncode == 0, again.stderr[-3000:]
    assert listed_shards(dataset) == listed_shards(reference) and validate_dataset(dataset).complete


@pytest.fixture
def tmpfs(tmp_path):
    mountpoint = tmp_path / "fs"
    mountpoint.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)], capture_output=True, text=True
    )
    if res.returncode != 0:
        pytest.skip(
            f"cannot mount a size-limited tmpfs here ({res.stderr.strip() or res.returncode}); the RLIMIT_FSIZE test "
            "covers it"
        )
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_full_tmpfs_while_writing_a_shard(fault_raw, reference, tmp_path, tmpfs):
    out = tmpfs / "run"
    config = write_config(tmp_path / "cfg.yaml", fault_raw(out))
    kept = copy_first_shards(reference, out / "dataset", keep=2)
    filler = tmpfs / "filler"
    st = os.statvfs(tmpfs)
    filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - PAGE))  # one page left: room for a manifest, not a shard
    assert os.statvfs(tmpfs).f_bavail * os.statvfs(tmpfs).f_frsize == PAGE
    assert min((reference / "shards" / n).stat().st_size for n in listed_shards(reference)) > PAGE
    res = distill("generate", str(config))
    _check_fault_then_rerun(
        config, out / "dataset", kept, reference, res, "No space left on device", free_space=filler.unlink
    )


def test_file_size_limit_while_writing_a_shard(fault_raw, reference, tmp_path):
    config = write_config(tmp_path / "cfg.yaml", fault_raw(tmp_path / "run"))
    dataset = tmp_path / "run" / "dataset"
    kept = copy_first_shards(reference, dataset, keep=2)
    manifest_bytes = len((reference / MANIFEST).read_bytes())
    smallest_shard = min((reference / "shards" / n).stat().st_size for n in listed_shards(reference))
    limit = (manifest_bytes + smallest_shard) // 2
    assert manifest_bytes < limit < smallest_shard
    res = distill("generate", str(config), fsize=limit)
    _check_fault_then_rerun(config, dataset, kept, reference, res, "File too large")
