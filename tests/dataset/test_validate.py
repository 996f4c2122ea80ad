"""`distill validate`: damaged, missing, mismatched and newer datasets are refused with the first problem."""

import json

import numpy as np
import pytest

from pipeline.dataset.schema import (
    build_table,
)
from pipeline.dataset.validate import DatasetInvalid, validate_dataset
from pipeline.dataset.writer import commit_shard, write_manifest, write_shard
from tests.helpers import copy_dataset, fake_generation, tiny_manifest


def test_validate_detects_truncated_shard(generated, tmp_path):
    ds = copy_dataset(generated.dataset_dir, tmp_path / "ds")
    shard = ds / "shards/part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DatasetInvalid, match="part-00001.parquet does not match its manifest checksum"):
        validate_dataset(ds)


def test_validate_detects_flipped_byte(generated, tmp_path):
    ds = copy_dataset(generated.dataset_dir, tmp_path / "ds")
    shard = ds / "shards/part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetInvalid, match="checksum"):
        validate_dataset(ds)


def test_validate_detects_missing_shard(generated, tmp_path):
    ds = copy_dataset(generated.dataset_dir, tmp_path / "ds")
    (ds / "shards/part-00002.parquet").unlink()
    with pytest.raises(DatasetInvalid, match="part-00002.parquet is listed in the manifest but missing"):
        validate_dataset(ds)


def test_validate_detects_manifest_mismatch(generated, tmp_path):
    ds = copy_dataset(generated.dataset_dir, tmp_path / "ds")
    raw = json.loads((ds / "manifest.json").read_text())
    raw["total_samples"] += 1
    (ds / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DatasetInvalid, match="total_samples"):
        validate_dataset(ds)


def test_validate_refuses_newer_schema(generated, tmp_path):
    ds = copy_dataset(generated.dataset_dir, tmp_path / "ds")
    raw = json.loads((ds / "manifest.json").read_text())
    raw["schema_version"] = 99
    (ds / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DatasetInvalid, match="schema_version 99 is newer"):
        validate_dataset(ds)


@pytest.mark.parametrize(
    "damage,message",
    [("unsorted", "not sorted descending"), ("mass", "sum to"), ("vocab", "outside the teacher vocabulary")],
)
def test_validate_checks_invariants(tmp_path, damage, message):
    rng = np.random.default_rng(1)
    g = fake_generation(rng, 4, 4, 50)
    if damage == "unsorted":
        g.topk_logprobs[1] = g.topk_logprobs[1][::-1].copy()
    elif damage == "mass":
        g.topk_logprobs[2] = np.log(np.full(4, 0.3, np.float32))
    else:
        g.topk_token_ids[0, 0] = 50
    table = build_table(
        prompt_ids=["a"], prompts=["p"], prompt_token_ids=[[1]], generations=[[g]], completions=[["c"]], seed=0
    )
    manifest = tiny_manifest()
    write_manifest(tmp_path, manifest)
    commit_shard(
        tmp_path, manifest, write_shard(tmp_path, 0, table, prompts=1, heldout_fraction=manifest.heldout_fraction)
    )
    with pytest.raises(DatasetInvalid, match=message):
        validate_dataset(tmp_path)


def test_validate_refuses_a_shard_with_other_column_types(tmp_path):
    """Nullable or required fields are both schema v1; a different column type is not."""
    import pyarrow as pa

    rng = np.random.default_rng(4)
    table = build_table(
        prompt_ids=["a"],
        prompts=["p"],
        prompt_token_ids=[[1]],
        generations=[[fake_generation(rng, 4, 4, 50)]],
        completions=[["c"]],
        seed=0,
    )
    wide = pa.list_(pa.field("element", pa.list_(pa.field("element", pa.int64(), nullable=False)), nullable=False))
    i = table.schema.get_field_index("topk_token_ids")
    table = table.set_column(i, table.schema.field(i).with_type(wide), table["topk_token_ids"].cast(wide))
    manifest = tiny_manifest()
    write_manifest(tmp_path, manifest)
    commit_shard(
        tmp_path, manifest, write_shard(tmp_path, 0, table, prompts=1, heldout_fraction=manifest.heldout_fraction)
    )
    with pytest.raises(DatasetInvalid, match="part-00000.parquet does not have the schema v1 columns/types"):
        validate_dataset(tmp_path)
