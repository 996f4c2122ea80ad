"""`kill -9` of `distill generate` at every kind of point, each followed by the same command again.

One dataset goes through seven real SIGKILLs in a row, each run resuming what the previous kill left
(temp files, an unlisted shard, an unrenamed manifest), and a last plain run finishes it. After every
kill the committed shards are unchanged and `validate` passes; at the end the dataset equals an
uninterrupted run's byte for byte: 0 samples lost, 0 duplicated.
"""

from __future__ import annotations

import fnmatch
import signal

import pyarrow.parquet as pq
import pytest

from pipeline.core import sha256_file
from pipeline.dataset.schema import MANIFEST
from pipeline.dataset.validate import validate_dataset
from tests.faults.harness import distill, files_on_disk, listed_shards, write_config

pytestmark = pytest.mark.slow  # real `distill` subprocesses

# (kill point, nth call, shards the manifest lists afterwards, leftovers the kill must have left)
STEPS = [
    ("teacher_load", 1, [], set()),  # before anything is written
    ("manifest_rename", 1, None, {".manifest.json.tmp-*"}),  # the very first manifest, never renamed: no manifest yet
    ("teacher_generate", 1, [], set()),  # manifest written, before the first shard
    (
        "shard_write",
        2,
        ["part-00000.parquet"],
        {"shards/.part-00001.parquet.tmp-*"},
    ),  # in the middle of writing shard 1
    ("shard_renamed", 1, ["part-00000.parquet"], {"shards/part-00001.parquet"}),  # shard 1 renamed, not yet listed
    (
        "manifest_rename",
        1,
        ["part-00000.parquet"],
        {".manifest.json.tmp-*", "shards/part-00001.parquet"},
    ),  # while updating the manifest
    ("teacher_generate", 2, ["part-00000.parquet", "part-00001.parquet"], set()),  # between shards
]


def _matches(pattern: str, names: set[str]) -> bool:
    return any(fnmatch.fnmatch(n, pattern) for n in names)


def test_kill_9_at_seven_points_then_rerun_completes_identically(fault_raw, reference, tmp_path):
    config = write_config(tmp_path / "cfg.yaml", fault_raw(tmp_path / "run"))
    dataset = tmp_path / "run" / "dataset"
    first_seen: dict[str, str] = {}  # sha256 of each shard when it was first committed

    for point, nth, listed, leftovers in STEPS:
        res = distill("generate", str(config), kill=(point, nth))
        assert res.returncode == -signal.SIGKILL, (
            f"{point}#{nth}: expected a SIGKILL, got {res.returncode}\n{res.stderr[-2000:]}"
        )
        on_disk = files_on_disk(dataset) if dataset.exists() else set()
        for pattern in leftovers:
            assert _matches(pattern, on_disk), f"{point}#{nth}: expected a leftover {pattern}, found {sorted(on_disk)}"
        if listed is None:
            assert MANIFEST not in on_disk, f"{point}#{nth}: a manifest appeared although its rename never happened"
            continue
        if not listed and point == "teacher_load":
            assert not on_disk, f"killed before anything was written, yet found {sorted(on_disk)}"
            continue
        shards = listed_shards(dataset)
        assert sorted(shards) == listed, f"{point}#{nth}: manifest lists {sorted(shards)}"
        for name, digest in shards.items():
            assert first_seen.setdefault(name, digest) == digest, f"{point}#{nth}: committed {name} changed"
        report = validate_dataset(dataset)  # a killed run leaves a valid, resumable (incomplete) dataset
        assert not report.complete and report.shards == len(listed)

    res = distill("generate", str(config))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "12 samples" in res.stdout
    report = validate_dataset(dataset)
    assert report.complete and report.samples == 12 and report.shards == 4
    ok = distill("validate", str(dataset))
    assert ok.returncode == 0 and "ok" in ok.stdout, ok.stdout + ok.stderr

    final = listed_shards(dataset)
    assert {n: final[n] for n in first_seen} == first_seen, "a shard committed before a kill was rewritten differently"
    assert final == listed_shards(reference), "the resumed dataset differs from an uninterrupted run"
    assert files_on_disk(dataset) == {MANIFEST, *(f"shards/{n}" for n in final)}, "temp or unlisted files were left"
    ids = [sid for n in sorted(final) for sid in pq.read_table(dataset / "shards" / n)["sample_id"].to_pylist()]
    ref_ids = [sid for n in sorted(final) for sid in pq.read_table(reference / "shards" / n)["sample_id"].to_pylist()]
    assert len(ids) == len(set(ids)) == 12 and set(ids) == set(ref_ids)  # 0 lost, 0 duplicated
    assert all(sha256_file(dataset / "shards" / n) == final[n] for n in final)
