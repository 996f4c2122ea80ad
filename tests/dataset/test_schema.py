"""The Parquet contract: round trip within the stated bound, invariants of generated data, and interop
(datasets, pandas, DuckDB)."""

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.dataset.schema import (
    IDS_LEAF,
    LP_LEAF,
    TOKEN_LP_LEAF,
    StorageRecord,
    arrow_schema,
    build_table,
    quantize_logprobs,
    read_manifest,
)
from pipeline.dataset.validate import validate_dataset
from pipeline.dataset.writer import commit_shard, write_manifest, write_shard
from tests.helpers import copy_dataset, fake_generation, read_rows, tiny_manifest


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_within_stated_bound(tmp_path, dtype):
    """Ids exact; logprobs within the grid's half step (float32) or that plus float16's half ulp."""
    rng = np.random.default_rng(0)
    gens = [[fake_generation(rng, length, 4, 50) for length in (3, 5)] for _ in range(3)]
    table = build_table(
        prompt_ids=["a", "b", "c"],
        prompts=["pa", "pb", "pc"],
        prompt_token_ids=[[1, 2], [3], [4, 5, 6]],
        generations=gens,
        completions=[["x", "y"]] * 3,
        seed=0,
        logprobs_dtype=dtype,
    )
    assert table.schema.equals(arrow_schema(dtype), check_metadata=False)
    manifest = tiny_manifest()
    manifest.logprobs_dtype = dtype
    write_manifest(tmp_path, manifest)
    commit_shard(
        tmp_path, manifest, write_shard(tmp_path, 0, table, prompts=3, heldout_fraction=manifest.heldout_fraction)
    )
    samples = read_rows(tmp_path)
    flat = [g for per in gens for g in per]
    assert len(samples) == 6 and samples.prompt_ids == ["a", "a", "b", "b", "c", "c"]
    bound = read_manifest(tmp_path).storage.max_logprob_error
    assert bound == 2.0**-8
    for got_ids, got_lp, got_tok, g in zip(samples.topk_ids, samples.topk_logprobs, samples.completion_tokens, flat):
        np.testing.assert_array_equal(got_ids, g.topk_token_ids)
        np.testing.assert_array_equal(got_tok, g.completion_token_ids)
        f16_ulp = (
            np.spacing(np.abs(g.topk_logprobs).astype(np.float16)).astype(np.float32) / 2 if dtype == "float16" else 0
        )
        assert (np.abs(got_lp - g.topk_logprobs) <= bound + f16_ulp).all()
        assert np.abs(got_lp - g.topk_logprobs).max() > 0  # really rounded, so the bound is the one being tested
    assert validate_dataset(tmp_path).samples == 6
    sample_ids = pq.read_table(tmp_path / "shards/part-00000.parquet")["sample_id"].to_pylist()
    assert len(set(sample_ids)) == 6


def test_shards_record_the_schema_version_and_standard_list_names(tmp_path):
    """Every shard's footer carries the Arrow schema: its version key, and lists whose items are named `element`
    (the Parquet standard name every reader expects)."""
    table = build_table(
        prompt_ids=["a"],
        prompts=["p"],
        prompt_token_ids=[[1]],
        generations=[[fake_generation(np.random.default_rng(5), 3, 4, 50)]],
        completions=[["c"]],
        seed=0,
    )
    info = write_shard(tmp_path, 0, table, prompts=1, heldout_fraction=0.0)
    assert pq.read_schema(tmp_path / info.file).metadata[b"distill_schema_version"] == b"1"
    for nullable in (False, True):
        for field in arrow_schema(nullable=nullable):
            t = field.type
            while hasattr(t, "value_field"):
                assert t.value_field.name == "element" and t.value_field.nullable == nullable, field
                t = t.value_type


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_build_table_of_no_rows_is_an_empty_shard(tmp_path, dtype):
    table = build_table(
        prompt_ids=[], prompts=[], prompt_token_ids=[], generations=[], completions=[], seed=0, logprobs_dtype=dtype
    )
    assert table.num_rows == 0 and table.schema.equals(arrow_schema(dtype), check_metadata=True)
    info = write_shard(tmp_path, 0, table, prompts=0, heldout_fraction=0.5)
    assert info.rows == info.tokens == 0 and pq.read_table(tmp_path / info.file).num_rows == 0


def test_build_table_rows_are_prompt_by_sample_with_seeded_ids():
    """Row (i, j) is sample j of prompt i: its id is stable_id(prompt id, j, seed), the other columns its own."""
    from pipeline.core import stable_id

    rng = np.random.default_rng(6)
    gens = [[fake_generation(rng, 2, 4, 50), fake_generation(rng, 3, 4, 50)], [fake_generation(rng, 1, 4, 50)]]
    gens[1][0].finish_reason = "stop"
    kw = dict(prompt_ids=["a", "b"], prompts=["pa", "pb"], prompt_token_ids=[[1, 2], [3]], generations=gens)
    table = build_table(**kw, completions=[["a0", "a1"], ["b0"]], seed=7, logprobs_step=0.0)
    rows = table.to_pylist()
    assert [r["sample_id"] for r in rows] == [stable_id("a", 0, 7), stable_id("a", 1, 7), stable_id("b", 0, 7)]
    assert [(r["prompt_id"], r["prompt"], r["completion"], r["prompt_token_ids"]) for r in rows] == [
        ("a", "pa", "a0", [1, 2]),
        ("a", "pa", "a1", [1, 2]),
        ("b", "pb", "b0", [3]),
    ]
    assert [r["finish_reason"] for r in rows] == ["length", "length", "stop"]
    for r, g in zip(rows, [gens[0][0], gens[0][1], gens[1][0]]):
        assert r["completion_token_ids"] == g.completion_token_ids.tolist()
        assert r["token_logprobs"] == g.token_logprobs.tolist()  # step 0: stored as given
        assert r["topk_token_ids"] == g.topk_token_ids.tolist() and r["topk_logprobs"] == g.topk_logprobs.tolist()
    other = build_table(**kw, completions=[["a0", "a1"], ["b0"]], seed=8)
    assert other["sample_id"].to_pylist()[0] == stable_id("a", 0, 8) != rows[0]["sample_id"]


def test_read_manifest_refuses_what_it_cannot_read_and_fills_old_fields(tmp_path):
    from pipeline.dataset.schema import DatasetError, committed_shards

    with pytest.raises(DatasetError, match=re.escape(f"{tmp_path}: no manifest.json (not a distill dataset")):
        read_manifest(tmp_path)
    manifest = tiny_manifest()
    write_manifest(tmp_path, manifest)
    with pytest.raises(DatasetError, match=re.escape(f"{tmp_path}: the dataset has no committed shards yet; run the")):
        committed_shards(tmp_path, read_manifest(tmp_path))
    raw = json.loads((tmp_path / "manifest.json").read_text())
    for version, shown in ((2, "2"), (None, "None"), ("1", "'1'")):
        (tmp_path / "manifest.json").write_text(json.dumps({**raw, "schema_version": version}))
        message = f"schema_version {shown} is newer than this distill supports (1); upgrade distill"
        with pytest.raises(DatasetError, match=f"^{re.escape(str(tmp_path / 'manifest.json'))}: {re.escape(message)}$"):
            read_manifest(tmp_path)
    del raw["storage"]["heldout_row_groups"]  # written before the split layout: its shards are not laid out by it
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    assert read_manifest(tmp_path).storage.heldout_row_groups is False
    assert tiny_manifest().storage.heldout_row_groups is True
    shard = {"rows": 1, "prompts": 1, "tokens": 1, "bytes": 1, "sha256": "x"}
    raw["shards"] = [{**shard, "index": i, "file": f"shards/part-0000{i}.parquet"} for i in (0, 1)]
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    got = committed_shards(tmp_path, read_manifest(tmp_path))
    assert got == [tmp_path / "shards/part-00000.parquet", tmp_path / "shards/part-00001.parquet"]


def test_remove_stray_files_deletes_only_what_the_manifest_does_not_list(tmp_path):
    from pipeline.dataset.writer import remove_stray_files

    manifest = tiny_manifest(num_shards=2)
    assert remove_stray_files(tmp_path, manifest) == []  # no shards/ yet
    write_manifest(tmp_path, manifest)
    table = build_table(
        prompt_ids=["a"],
        prompts=["p"],
        prompt_token_ids=[[1]],
        generations=[[fake_generation(np.random.default_rng(7), 2, 4, 50)]],
        completions=[["c"]],
        seed=0,
    )
    manifest = commit_shard(tmp_path, manifest, write_shard(tmp_path, 0, table, prompts=1, heldout_fraction=0.0))
    write_shard(tmp_path, 1, table, prompts=1, heldout_fraction=0.0)  # written, never committed
    for stray in ("shards/.part-00001.parquet.tmp-7", ".manifest.json.tmp-9"):
        (tmp_path / stray).write_bytes(b"x")
    (tmp_path / "notes.txt").write_bytes(b"kept")
    removed = remove_stray_files(tmp_path, manifest)
    assert sorted(removed) == [".manifest.json.tmp-9", ".part-00001.parquet.tmp-7", "part-00001.parquet"]
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == ["manifest.json", "notes.txt", "shards", "shards/part-00000.parquet"]
    assert remove_stray_files(tmp_path, manifest) == []


def test_parquet_options_realise_the_storage_record(tmp_path):
    """Explicit encodings win over dictionary encoding; float16 logprobs fall back to PLAIN; an explicit
    dictionary list is used as given, an empty one turns dictionary encoding off."""
    from pipeline.dataset.writer import parquet_options

    split = "BYTE_STREAM_SPLIT"
    plain = ["sample_id", "prompt_id", "prompt", "completion", "prompt_token_ids.list.element"]
    plain += ["completion_token_ids.list.element", "finish_reason"]
    assert parquet_options(StorageRecord()) == {
        "compression": "zstd",
        "compression_level": 9,
        "row_group_size": 1024,
        "use_dictionary": plain,
        "column_encoding": {IDS_LEAF: split, LP_LEAF: split, TOKEN_LP_LEAF: split},
    }
    half = parquet_options(StorageRecord(compression_level=3, row_group_size=7), arrow_schema("float16"))
    assert half["column_encoding"] == {IDS_LEAF: split, LP_LEAF: "PLAIN", TOKEN_LP_LEAF: split}
    assert (half["compression_level"], half["row_group_size"]) == (3, 7)
    listed = StorageRecord(dictionary_columns=["prompt"], column_encoding={})
    assert parquet_options(listed)["use_dictionary"] == ["prompt"]
    assert parquet_options(listed)["column_encoding"] is None
    assert parquet_options(StorageRecord(dictionary_columns=[]))["use_dictionary"] is False
    table = build_table(
        prompt_ids=["a"],
        prompts=["p"],
        prompt_token_ids=[[1]],
        generations=[[fake_generation(np.random.default_rng(8), 2, 4, 50)]],
        completions=[["c"]],
        seed=0,
    )
    info = write_shard(tmp_path, 0, table, prompts=1, heldout_fraction=0.0, storage=listed)
    md = pq.ParquetFile(tmp_path / info.file).metadata.row_group(0)
    dictionary = {
        md.column(i).path_in_schema for i in range(md.num_columns) if "RLE_DICTIONARY" in md.column(i).encodings
    }
    assert dictionary == {"prompt"}


def test_commit_shard_replaces_a_stale_entry_and_keeps_the_totals(tmp_path):
    """Shards may be written into a directory that does not exist yet; each commit rewrites manifest.json (indented,
    one trailing newline) with the shards sorted by index, the totals and `complete`."""
    ds = tmp_path / "new" / "ds"
    rng = np.random.default_rng(9)
    gens = [[fake_generation(rng, 2 + i, 4, 50)] for i in range(3)]
    table = build_table(
        prompt_ids=["a", "b", "c"],
        prompts=["p"] * 3,
        prompt_token_ids=[[1]] * 3,
        generations=gens,
        completions=[["c"]] * 3,
        seed=0,
    )
    first = write_shard(ds, 1, table.slice(0, 2), prompts=2, heldout_fraction=0.0)
    assert (first.rows, first.prompts, first.tokens) == (2, 2, 5)
    manifest = tiny_manifest(num_shards=2)
    manifest.updated_at = "2000-01-01T00:00:00Z"
    manifest = commit_shard(ds, manifest, first)
    text = (ds / "manifest.json").read_text()
    assert text == manifest.model_dump_json(indent=2) + "\n" and manifest.updated_at > "2000"
    assert (manifest.total_samples, manifest.total_tokens, manifest.complete) == (2, 5, False)
    manifest = commit_shard(ds, manifest, write_shard(ds, 0, table.slice(2), prompts=1, heldout_fraction=0.0))
    assert [s.index for s in manifest.shards] == [0, 1] and manifest.complete
    manifest = commit_shard(ds, manifest, write_shard(ds, 1, table, prompts=3, heldout_fraction=0.0))  # rewritten
    assert [(s.index, s.rows, s.tokens) for s in manifest.shards] == [(0, 1, 4), (1, 3, 9)]
    assert (manifest.total_samples, manifest.total_tokens, manifest.complete) == (4, 13, True)
    assert read_manifest(ds).model_dump() == manifest.model_dump()


def test_write_shard_row_groups_and_a_failed_write(tmp_path, monkeypatch):
    """Held-out rows get row groups of their own, and a part with no rows adds none; a write that fails leaves
    no file behind and raises its own error."""
    from pipeline.dataset import writer

    ids = ["ffffffff", "00000000", "e0000000"]  # kept, held out, kept at fraction 0.5
    table = build_table(
        prompt_ids=ids,
        prompts=["p"] * 3,
        prompt_token_ids=[[1]] * 3,
        generations=[[fake_generation(np.random.default_rng(10), 2, 4, 50)] for _ in ids],
        completions=[["c"]] * 3,
        seed=0,
    )
    for index, (rows, fraction, groups) in enumerate([(3, 0.5, [2, 1]), (2, 0.5, [2]), (3, 0.0, [3])]):
        part = table.filter(pa.array([i != 1 for i in range(3)])) if rows == 2 else table
        info = write_shard(tmp_path, index, part, prompts=rows, heldout_fraction=fraction)
        md = pq.ParquetFile(tmp_path / info.file).metadata
        assert [md.row_group(i).num_rows for i in range(md.num_row_groups)] == groups
    held_last = pq.read_table(tmp_path / "shards/part-00000.parquet")["prompt_id"].to_pylist()
    assert held_last == ["ffffffff", "e0000000", "00000000"]

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer.pq, "ParquetWriter", no_space)
    with pytest.raises(OSError, match="No space left on device"):
        write_shard(tmp_path / "full", 0, table, prompts=3, heldout_fraction=0.0)
    assert list((tmp_path / "full" / "shards").iterdir()) == []


def test_generated_dataset_invariants(generated):
    manifest = read_manifest(generated.dataset_dir)
    assert manifest.complete and manifest.k == 8 and manifest.logprobs_mode == "raw"
    assert manifest.total_samples == manifest.num_prompts == 96 and len(manifest.shards) == 3
    s = read_rows(generated.dataset_dir)
    for ids, lp, tok, tlp in zip(s.topk_ids, s.topk_logprobs, s.completion_tokens, s.token_logprobs):
        assert ids.shape == lp.shape == (len(tok), 8) and len(tlp) == len(tok)
        assert (np.diff(lp, axis=1) <= 1e-6).all()  # sorted descending
        assert (np.logaddexp.reduce(lp.astype(np.float64), axis=1) <= 1e-5 + manifest.storage.max_logprob_error).all()
        assert ids.max() < manifest.teacher.vocab_size and ids.min() >= 0
        in_topk = ids == tok[:, None]  # where the sampled token is in the top-k, its logprob is that entry
        rows = in_topk.any(1)
        np.testing.assert_array_equal(tlp[rows], lp[in_topk])  # the same grid for both columns
        assert (tlp <= lp[:, :1].ravel() + 1e-5).all()
    assert validate_dataset(generated.dataset_dir).samples == 96


def test_hf_datasets_loads_the_shards(generated):
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(generated.dataset_dir / "shards/*.parquet"), split="train")
    assert ds.num_rows == 96
    row = ds[0]
    assert len(row["topk_token_ids"]) == len(row["completion_token_ids"]) and len(row["topk_token_ids"][0]) == 8
    s = read_rows(generated.dataset_dir)  # the shards' order: row 0 is the first sample of shard 0
    np.testing.assert_array_equal(np.array(row["topk_logprobs"], np.float32), s.topk_logprobs[0])
    np.testing.assert_array_equal(np.array(row["topk_token_ids"]), s.topk_ids[0])


def test_quantize_logprobs_error_bound():
    x = np.random.default_rng(0).uniform(-40, 0, 100_000).astype(np.float32)
    for step in (2.0**-6, 2.0**-7, 2.0**-8):
        q = quantize_logprobs(x, step)
        assert q.dtype == np.float32 and np.abs(q - x).max() <= step / 2
        np.testing.assert_array_equal(q / step, np.round(q / step))  # exactly on the grid
        assert (np.diff(q[np.argsort(-x)]) <= 0).all()  # monotone: sorted rows stay sorted
    np.testing.assert_array_equal(quantize_logprobs(x, 0.0), x)
    with pytest.raises(ValueError, match="power of two"):
        StorageRecord(logprobs_step=0.01)


def test_manifest_records_the_encoding_and_shards_use_it(tmp_path):
    rng = np.random.default_rng(2)
    gens = [[fake_generation(rng, 6, 4, 50)] for _ in range(3)]
    table = build_table(
        prompt_ids=["a", "b", "c"],
        prompts=["pa", "pb", "pc"],
        prompt_token_ids=[[1], [2], [3]],
        generations=gens,
        completions=[["x"]] * 3,
        seed=0,
    )
    storage = StorageRecord(compression_level=5, row_group_size=2)
    manifest = tiny_manifest()
    manifest.storage = storage
    write_manifest(tmp_path, manifest)
    commit_shard(
        tmp_path,
        manifest,
        write_shard(tmp_path, 0, table, prompts=3, storage=storage, heldout_fraction=manifest.heldout_fraction),
    )
    back = read_manifest(tmp_path).storage
    assert back == storage and back.logprobs_step == 2.0**-7
    md = pq.ParquetFile(tmp_path / "shards/part-00000.parquet").metadata
    assert md.num_row_groups == 2 and md.row_group(0).num_rows == 2
    cols = {md.row_group(0).column(i).path_in_schema: md.row_group(0).column(i) for i in range(md.num_columns)}
    for leaf in (IDS_LEAF, LP_LEAF, TOKEN_LP_LEAF):
        assert back.column_encoding[leaf] == "BYTE_STREAM_SPLIT" in cols[leaf].encodings
        assert "RLE_DICTIONARY" not in cols[leaf].encodings
    assert "RLE_DICTIONARY" in cols["finish_reason"].encodings and cols["sample_id"].compression == "ZSTD"


def test_shards_are_required_and_older_nullable_shards_still_read(tmp_path):
    """New shards store every field as Parquet `required` (no definition levels to decode); a dataset whose first
    shard was written before that (nullable fields) and whose second is new validates and reads as one."""
    from pipeline.dataset.stream import TrainStream

    rng = np.random.default_rng(3)
    manifest = tiny_manifest(num_shards=2)
    write_manifest(tmp_path, manifest)
    tables = []
    for index in range(2):
        gens = [[fake_generation(rng, 3 + i, 4, 50)] for i in range(3)]
        tables.append(
            build_table(
                prompt_ids=[f"{index}a", f"{index}b", f"{index}c"],
                prompts=["p"] * 3,
                prompt_token_ids=[[1], [2, 3], [4]],
                generations=gens,
                completions=[["x"]] * 3,
                seed=0,
            )
        )
    old = tables[0].cast(arrow_schema(nullable=True))
    for index, table in enumerate([old, tables[1]]):
        manifest = commit_shard(
            tmp_path,
            manifest,
            write_shard(tmp_path, index, table, prompts=3, heldout_fraction=manifest.heldout_fraction),
        )
    schemas = [pq.ParquetFile(tmp_path / f"shards/part-0000{i}.parquet").schema for i in range(2)]
    assert "optional" in str(schemas[0]) and "optional" not in str(schemas[1])  # the older layout really is written
    assert str(schemas[1]).count("required int32 field_id=-1 element") == 3  # prompt, completion, top-k ids

    assert validate_dataset(tmp_path).samples == 6
    samples = read_rows(tmp_path)
    assert [len(t) for t in samples.completion_tokens] == [3, 4, 5] * 2
    stream = TrainStream(tmp_path, split="all", batch_size=6, pad_id=0)
    batch = next(stream.batches())
    assert batch.n_tokens == 24 and batch.topk_ids.shape == (24, 4)
    expected = np.concatenate([t["topk_token_ids"].combine_chunks().flatten().flatten().to_numpy() for t in tables])
    assert sorted(batch.topk_ids.numpy().ravel().tolist()) == sorted(expected.tolist())
    want = [pid for t in tables for pid in t["prompt_id"].to_pylist()]
    for size in (4, 7):  # a batch across both shards, then a last (short) batch across both
        stream = TrainStream(tmp_path, split="all", batch_size=size, pad_id=0)
        got = [t["prompt_id"].to_pylist() for _, t in stream.in_order(["prompt_id"])]
        assert got == [want[i : i + size] for i in range(0, 6, size)]


def test_float16_logprobs_are_written_plain_for_duckdb(tmp_path):
    rng = np.random.default_rng(3)
    table = build_table(
        prompt_ids=["a"],
        prompts=["p"],
        prompt_token_ids=[[1]],
        generations=[[fake_generation(rng, 5, 4, 50)]],
        completions=[["c"]],
        seed=0,
        logprobs_dtype="float16",
    )
    manifest = tiny_manifest()
    manifest.logprobs_dtype = "float16"
    write_manifest(tmp_path, manifest)
    commit_shard(
        tmp_path, manifest, write_shard(tmp_path, 0, table, prompts=1, heldout_fraction=manifest.heldout_fraction)
    )
    path = tmp_path / "shards/part-00000.parquet"
    cols = {c.path_in_schema: c for c in (pq.ParquetFile(path).metadata.row_group(0).column(i) for i in range(10))}
    assert "BYTE_STREAM_SPLIT" not in cols[LP_LEAF].encodings and "BYTE_STREAM_SPLIT" in cols[IDS_LEAF].encodings
    assert validate_dataset(tmp_path).samples == 1
    duckdb = pytest.importorskip("duckdb")
    got = duckdb.sql(f"select topk_logprobs from read_parquet('{path}')").fetchall()[0][0]
    np.testing.assert_array_equal(np.array(got, np.float32), read_rows(tmp_path).topk_logprobs[0])


def test_old_manifest_without_storage_reads_as_unrecorded(generated, tmp_path):
    ds = copy_dataset(generated.dataset_dir, tmp_path / "ds")
    raw = json.loads((ds / "manifest.json").read_text())
    assert raw["storage"]["logprobs_step"] == 2.0**-7
    del raw["storage"]
    (ds / "manifest.json").write_text(json.dumps(raw))
    assert read_manifest(ds).storage is None
    assert validate_dataset(ds).samples == 96


def test_pandas_and_duckdb_read_the_plain_types(generated):
    import pandas as pd

    files = sorted(str(p) for p in (generated.dataset_dir / "shards").glob("*.parquet"))
    s = read_rows(generated.dataset_dir)
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    assert len(df) == 96
    np.testing.assert_array_equal(np.stack(df["topk_logprobs"][0]), s.topk_logprobs[0])
    duckdb = pytest.importorskip("duckdb")
    row = duckdb.sql(f"select topk_token_ids, topk_logprobs from read_parquet({files!r}) limit 1").fetchall()[0]
    np.testing.assert_array_equal(np.array(row[0]), s.topk_ids[0])
    np.testing.assert_allclose(np.array(row[1]), s.topk_logprobs[0], atol=0)
