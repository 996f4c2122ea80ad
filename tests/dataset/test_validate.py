"""`distill validate`: damaged, missing, mismatched and newer datasets are refused with the first problem."""

import json
import re

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


HELD, KEPT = "00000000", "ffffffff"  # prompt ids held out / kept at any heldout_fraction in (0, 1)


def _gen(length: int, k: int = 4, vocab: int = 50, seed: int = 0):
    return fake_generation(np.random.default_rng(seed), length, k, vocab)


def _dataset(tmp_path, shards, *, num_shards=None, step=2.0**-7, write_storage=None, **fields):
    """A committed dataset: `shards` is a list of (prompt ids, one generation per prompt)."""
    from pipeline.dataset.schema import StorageRecord

    tmp_path.mkdir(parents=True, exist_ok=True)
    manifest = tiny_manifest(num_shards=num_shards or len(shards), **fields)
    manifest.storage = StorageRecord(logprobs_step=step)
    write_manifest(tmp_path, manifest)
    for index, (ids, gens) in enumerate(shards):
        table = build_table(
            prompt_ids=ids,
            prompts=["p"] * len(ids),
            prompt_token_ids=[[1]] * len(ids),
            generations=[[g] for g in gens],
            completions=[["c"]] * len(ids),
            seed=0,
            logprobs_step=step,
        )
        info = write_shard(
            tmp_path,
            index,
            table,
            prompts=len(ids),
            heldout_fraction=manifest.heldout_fraction,
            storage=write_storage or manifest.storage,
        )
        manifest = commit_shard(tmp_path, manifest, info)
    return manifest


def test_validate_reports_shards_samples_tokens_and_completeness(tmp_path):
    from pipeline.dataset.validate import ValidationReport

    _dataset(tmp_path / "a", [(["a", "b"], [_gen(3), _gen(4)]), (["c"], [_gen(5)])])
    assert validate_dataset(tmp_path / "a") == ValidationReport(shards=2, samples=3, tokens=12, complete=True)
    _dataset(tmp_path / "b", [(["a", "b"], [_gen(3), _gen(4)])], num_shards=2)
    assert validate_dataset(tmp_path / "b") == ValidationReport(shards=1, samples=2, tokens=7, complete=False)


def _shorter(name: str):
    g = _gen(3)
    setattr(g, name, getattr(g, name)[:2])
    return g


@pytest.mark.parametrize(
    "second,message",
    [
        (_shorter("token_logprobs"), "part-00000.parquet row 1: token_logprobs has 2 entries but the completion has 3"),
        (_shorter("topk_token_ids"), "part-00000.parquet row 1: topk_token_ids has 2 entries but the completion has 3"),
        (_shorter("topk_logprobs"), "part-00000.parquet row 1: topk_logprobs has 2 entries but the completion has 3"),
        (_gen(1, k=3), "part-00000.parquet: topk_token_ids rows must hold k=4 entries per token, found 3"),
    ],
)
def test_validate_names_the_row_whose_lengths_disagree(tmp_path, second, message):
    _dataset(tmp_path, [(["a", "b"], [_gen(2), second])])
    with pytest.raises(DatasetInvalid, match=re.escape(message)):
        validate_dataset(tmp_path)


def test_validate_checks_logprob_widths_separately(tmp_path):
    g = _gen(3)
    g.topk_logprobs = g.topk_logprobs[:, :3].copy()
    _dataset(tmp_path, [(["a"], [g])])
    with pytest.raises(DatasetInvalid, match=re.escape("topk_logprobs rows must hold k=4 entries per token, found 3")):
        validate_dataset(tmp_path)


@pytest.mark.parametrize(
    "column,value,shown",
    [
        ("topk_token_ids", 50, 50),
        ("topk_token_ids", -1, -1),
        ("completion_token_ids", 50, 50),
        ("completion_token_ids", -3, -3),
    ],
)
def test_validate_refuses_ids_outside_the_vocabulary(tmp_path, column, value, shown):
    g = _gen(3)
    getattr(g, column).reshape(-1)[-1] = value
    _dataset(tmp_path, [(["a"], [g])])
    with pytest.raises(DatasetInvalid, match=re.escape(f"token id {shown} is outside the teacher vocabulary [0, 50)")):
        validate_dataset(tmp_path)
    g = _gen(3)
    getattr(g, column).reshape(-1)[-1] = 49 if value > 0 else 0  # both ends of the vocabulary are in it
    _dataset(tmp_path / "ok", [(["a"], [g])])
    assert validate_dataset(tmp_path / "ok").samples == 1


def test_validate_names_the_flat_token_of_bad_logprobs(tmp_path):
    first, second = _gen(2), _gen(3)
    second.topk_logprobs[1] = second.topk_logprobs[1][::-1].copy()
    _dataset(tmp_path / "order", [(["a", "b"], [first, second])])
    with pytest.raises(DatasetInvalid, match="top-k logprobs at flat token 3 are not sorted descending"):
        validate_dataset(tmp_path / "order")
    second = _gen(3)
    second.topk_logprobs[2] = np.log(np.full(4, 0.3, np.float32))
    _dataset(tmp_path / "mass", [(["a", "b"], [first, second])], step=0.0)
    message = "top-k probabilities at flat token 4 sum to 1.2000 > 1 (logsumexp 0.1823 > 0)"
    with pytest.raises(DatasetInvalid, match=re.escape(message)):
        validate_dataset(tmp_path / "mass")
    second = _gen(3)
    second.topk_logprobs[0, 2] = np.nan
    _dataset(tmp_path / "nan", [(["a", "b"], [first, second])])
    with pytest.raises(DatasetInvalid, match="part-00000.parquet: topk_logprobs contains NaN"):
        validate_dataset(tmp_path / "nan")


@pytest.mark.parametrize(
    "step,value,ok",
    [
        (0.0, np.log(0.25) + 0.9e-3, True),  # logsumexp 0.0009: within float16's tolerance
        (0.0, np.log(0.25) + 1.1e-3, False),
        (2.0**-7, -1.3828125, True),  # on the grid, logsumexp 0.0035: allowed only by the grid's half step
        (2.0**-7, -1.375, False),  # logsumexp 0.0113
    ],
)
def test_validate_allows_the_stated_rounding_above_a_sum_of_one(tmp_path, step, value, ok):
    """Top-k mass may exceed 1 by the float16 tolerance (1e-3 in logsumexp) plus the grid's half step."""
    g = _gen(2)
    g.topk_logprobs[1] = np.float32(value)
    _dataset(tmp_path, [(["a"], [g])], step=step)
    if ok:
        assert validate_dataset(tmp_path).samples == 1
    else:
        with pytest.raises(DatasetInvalid, match="sum to"):
            validate_dataset(tmp_path)


def test_validate_checks_the_held_out_layout_only_where_the_manifest_states_it(tmp_path):
    from pipeline.dataset.schema import StorageRecord

    plain = StorageRecord(heldout_row_groups=False)  # rows kept in the order given, one row group
    gens = [_gen(2), _gen(2)]
    _dataset(tmp_path / "good", [([KEPT, HELD], gens)], heldout_fraction=0.5)  # written apart, as stated
    assert validate_dataset(tmp_path / "good").samples == 2
    _dataset(tmp_path / "order", [([HELD, KEPT], gens)], heldout_fraction=0.5, write_storage=plain)
    with pytest.raises(DatasetInvalid, match="part-00000.parquet: a training row follows a held-out row"):
        validate_dataset(tmp_path / "order")
    _dataset(tmp_path / "mixed", [([KEPT, HELD], gens)], heldout_fraction=0.5, write_storage=plain)
    with pytest.raises(DatasetInvalid, match="part-00000.parquet: row group 0 mixes training and held-out rows"):
        validate_dataset(tmp_path / "mixed")
    pairs = StorageRecord(heldout_row_groups=False, row_group_size=2)
    ids = [KEPT, "f0000000", "e0000000", HELD]  # row groups [kept, kept] and [kept, held]
    _dataset(tmp_path / "later", [(ids, gens * 2)], heldout_fraction=0.5, write_storage=pairs)
    with pytest.raises(DatasetInvalid, match="part-00000.parquet: row group 1 mixes training and held-out rows"):
        validate_dataset(tmp_path / "later")
    manifest = _dataset(tmp_path / "old", [([HELD, KEPT], gens)], heldout_fraction=0.5, write_storage=plain)
    manifest.storage.heldout_row_groups = False  # written before the layout existed: not checked
    write_manifest(tmp_path / "old", manifest)
    assert validate_dataset(tmp_path / "old").samples == 2


def test_validate_finds_a_sample_id_repeated_across_shards(tmp_path):
    from pipeline.core import stable_id

    _dataset(tmp_path, [(["a"], [_gen(2)]), (["b"], [_gen(2)]), (["a"], [_gen(2)])])
    with pytest.raises(
        DatasetInvalid, match=re.escape(f"duplicate sample_id {stable_id('a', 0, 0)} (in shards/part-00002")
    ):
        validate_dataset(tmp_path)


def test_validate_compares_rows_and_reads_the_shard(tmp_path):
    import hashlib

    _dataset(tmp_path, [(["a", "b"], [_gen(2), _gen(3)])])
    raw = json.loads((tmp_path / "manifest.json").read_text())
    raw["shards"][0]["rows"] = 3
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(
        DatasetInvalid, match=re.escape("shard shards/part-00000.parquet has 2 rows but the manifest says 3")
    ):
        validate_dataset(tmp_path)
    garbage = b"not parquet at all"
    (tmp_path / raw["shards"][0]["file"]).write_bytes(garbage)
    raw["shards"][0].update(bytes=len(garbage), sha256=hashlib.sha256(garbage).hexdigest())
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DatasetInvalid, match=re.escape("shard shards/part-00000.parquet is not readable Parquet: ")):
        validate_dataset(tmp_path)


def test_validate_and_verify_shards_without_a_manifest_or_with_a_changed_shard(tmp_path):
    from pipeline.dataset.validate import shard_is_intact, verify_shards

    with pytest.raises(DatasetInvalid, match=re.escape(f"{tmp_path}: no manifest.json (not a distill dataset")):
        validate_dataset(tmp_path)
    manifest = _dataset(tmp_path, [(["a"], [_gen(2)]), (["b"], [_gen(3)])])
    verify_shards(tmp_path)  # intact: no error
    assert all(shard_is_intact(tmp_path, s) for s in manifest.shards)
    shard = tmp_path / manifest.shards[1].file
    data = bytearray(shard.read_bytes())
    data[-5] ^= 1  # same size, other bytes
    shard.write_bytes(bytes(data))
    assert shard_is_intact(tmp_path, manifest.shards[0]) and not shard_is_intact(tmp_path, manifest.shards[1])
    message = "shard shards/part-00001.parquet is missing or does not match its manifest checksum; rerun"
    with pytest.raises(DatasetInvalid, match=re.escape(message)):
        verify_shards(tmp_path)
    rerun = "rerun `distill generate` with the same config to rewrite it"
    changed = f"shard shards/part-00001.parquet does not match its manifest checksum (corrupted or modified); {rerun}"
    with pytest.raises(DatasetInvalid, match=f"^{re.escape(changed)}$"):
        validate_dataset(tmp_path)
    shard.unlink()
    with pytest.raises(DatasetInvalid, match=re.escape(message)):
        verify_shards(tmp_path, manifest)
    missing = f"shard shards/part-00001.parquet is listed in the manifest but missing; {rerun}"
    with pytest.raises(DatasetInvalid, match=f"^{re.escape(missing)}$"):
        validate_dataset(tmp_path)


@pytest.mark.parametrize("lse,ok", [(0.9e-3, True), (2e-3, False)])
def test_validate_reads_a_manifest_without_storage_as_unrounded_shards(tmp_path, lse, ok):
    """Manifests written before `storage` existed: no grid, so only the float16 tolerance is allowed."""
    g = _gen(2)
    g.topk_logprobs[1] = np.float32(np.log(0.25) + lse)
    _dataset(tmp_path, [(["a"], [g])], step=0.0)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    del raw["storage"]
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    if ok:
        assert validate_dataset(tmp_path).samples == 1
    else:
        with pytest.raises(DatasetInvalid, match="sum to"):
            validate_dataset(tmp_path)


def test_validate_compares_the_manifest_total_with_the_shards(tmp_path):
    _dataset(tmp_path, [(["a", "b"], [_gen(2), _gen(2)]), (["c"], [_gen(2)])])
    raw = json.loads((tmp_path / "manifest.json").read_text())
    raw["total_samples"] = 4
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DatasetInvalid, match="^manifest total_samples=4 but the shards hold 3$"):
        validate_dataset(tmp_path)
