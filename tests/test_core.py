"""pipeline/core.py: ids, the held-out split rule, crash-safe writes and which errors count as the user's."""

from __future__ import annotations

import errno
import os

import pyarrow as pa

from pipeline.core import (
    DiskFullError,
    UserError,
    as_user_error,
    atomic_write_bytes,
    heldout_mask,
    is_heldout,
    looks_local,
    path_fingerprint,
    stable_id,
)


def test_stable_id_is_a_pinned_function_of_its_parts():
    # pinned: prompt and sample ids in every existing dataset depend on this exact hash
    assert stable_id("a", 1) == "839e11a421d370be"
    assert stable_id("a", 1) == stable_id("a", 1) != stable_id("a", 2)
    assert stable_id("ab") != stable_id("a", "b")  # parts are separated, not concatenated


def test_heldout_rule_is_a_threshold_on_the_first_eight_hex_digits():
    assert is_heldout("00000000ffff", 0.1) and not is_heldout("1a000000", 0.1)  # 0x1a/0x100 = 0.102
    assert is_heldout("19999999", 0.1) and not is_heldout("ffffffff", 0.999)
    assert not is_heldout("00000000", 0.0)
    ids = [stable_id(i) for i in range(2000)]
    mask = heldout_mask(pa.array(ids), 0.3)
    assert mask.tolist() == [is_heldout(i, 0.3) for i in ids]
    assert abs(mask.mean() - 0.3) < 0.05
    chunked = pa.chunked_array([pa.array(ids[:700]), pa.array(ids[700:2000])])
    assert heldout_mask(chunked, 0.3).tolist() == mask.tolist()
    assert heldout_mask(pa.array(["FFFFFFFF", "00000000"]), 0.5).tolist() == [False, True]  # uppercase too


def test_atomic_write_replaces_whole_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "manifest.json"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new contents")
    assert path.read_bytes() == b"new contents" and sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_only_user_errors_and_a_full_disk_are_the_users():
    assert isinstance(as_user_error(UserError("x")), UserError)
    full = as_user_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/shard"))
    assert isinstance(full, DiskFullError) and "cannot write /data/shard" in str(full) and "rerun" in str(full)
    assert as_user_error(OSError(errno.EACCES, "denied")) is None
    assert as_user_error(ValueError("a shape bug")) is None  # a bug keeps its traceback
    assert as_user_error(FileNotFoundError("missing")) is None


def test_looks_local_tells_paths_from_hub_ids():
    assert looks_local("./m") and looks_local("/abs/m") and looks_local("~/m") and looks_local("data/models/x")
    assert looks_local("a/b/c")
    assert not looks_local("Qwen/Qwen2.5-0.5B") and not looks_local("gpt2")


def test_path_fingerprint_follows_content_not_time(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    first = path_fingerprint(str(tmp_path / "m"))
    os.utime(tmp_path / "m" / "config.json", (0, 0))
    assert path_fingerprint(str(tmp_path / "m")) == first
    (tmp_path / "m" / "config.json").write_text('{"a": 1}')
    assert path_fingerprint(str(tmp_path / "m")) != first
    assert path_fingerprint("org/not-a-local-path") == ""
