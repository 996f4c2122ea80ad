"""A split as per-sample arrays (`load_samples`, for tests and tools), the held-out rule it reads by, and the
split row-group layout. The streaming reader's tests are in tests/dataset/test_stream.py."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core import is_heldout, stable_id
from pipeline.dataset.reader import load_samples
from pipeline.dataset.schema import DatasetError, committed_shards, read_manifest
from pipeline.dataset.writer import write_manifest
from tests.helpers import small_dataset


def test_vectorised_heldout_mask_matches_is_heldout():
    import pyarrow as pa

    from pipeline.core import heldout_mask

    # "abc": too short, per id
    ids = [stable_id("p", i) for i in range(500)] + ["FFFFFFFF00", "00000000", "abc", "7fffffff"]
    for fraction in (0.0, 0.1, 0.3, 0.5, 1.0):
        want = [is_heldout(i, fraction) for i in ids]
        assert heldout_mask(pa.array(ids), fraction).tolist() == want  # mixed: falls back per id
        assert heldout_mask(pa.array(ids[:500]), fraction).tolist() == want[:500]  # vectorised path
        assert heldout_mask(pa.array(ids).slice(3, 400), fraction).tolist() == want[3:403]
    assert 100 < sum(heldout_mask(pa.array(ids[:500]), 0.3)) < 200


def test_split_layout_puts_heldout_rows_in_row_groups_of_their_own(tmp_path):
    import pyarrow.parquet as pq

    from pipeline.core import heldout_mask
    from pipeline.dataset.validate import DatasetInvalid, validate_dataset

    manifest = small_dataset(tmp_path / "split")
    for shard in manifest.shards:
        pf = pq.ParquetFile(tmp_path / "split" / shard.file)
        groups = [
            heldout_mask(pf.read_row_group(i, columns=["prompt_id"])["prompt_id"], 0.3)
            for i in range(pf.num_row_groups)
        ]
        assert all(g.all() or not g.any() for g in groups)  # no row group mixes the splits
        flags = [bool(g[0]) for g in groups]
        assert flags == sorted(flags) and True in flags and False in flags  # training row groups first
    assert validate_dataset(tmp_path / "split").samples == 69
    # both layouts hold the same samples, split for split
    small_dataset(tmp_path / "mixed", split_layout=False)
    for split in ("train", "heldout"):
        a, b = load_samples(tmp_path / "split", split=split), load_samples(tmp_path / "mixed", split=split)
        assert sorted(a.prompt_ids) == sorted(b.prompt_ids) and len(a) > 0

    # a manifest that claims the layout for interleaved shards is caught
    claimed = read_manifest(tmp_path / "mixed")
    claimed.storage.heldout_row_groups = True
    write_manifest(tmp_path / "mixed", claimed)
    with pytest.raises(DatasetInvalid, match=r"part-00000.parquet: (row group \d+ mixes|a training row follows)"):
        validate_dataset(tmp_path / "mixed")


def test_manifests_from_before_the_split_layout_read_as_interleaved(tmp_path):
    import json

    small_dataset(tmp_path, split_layout=False)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    del raw["storage"]["heldout_row_groups"]
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    assert read_manifest(tmp_path).storage.heldout_row_groups is False


def test_load_samples_reads_the_split_in_file_order(tmp_path):
    import numpy as np

    from pipeline.core import heldout_mask

    manifest = small_dataset(tmp_path, split_layout=False)
    table = pa.concat_tables([pq.read_table(p) for p in committed_shards(tmp_path, read_manifest(tmp_path))])
    held = heldout_mask(table["prompt_id"], manifest.heldout_fraction)
    for split, keep in (("all", np.ones(len(held), bool)), ("heldout", held), ("train", ~held)):
        want = table.filter(pa.array(keep))
        s = load_samples(tmp_path, split=split)
        assert s.prompt_ids == want["prompt_id"].to_pylist() and len(s) == want.num_rows
        assert [t.tolist() for t in s.prompt_tokens] == want["prompt_token_ids"].to_pylist()
        assert [t.tolist() for t in s.completion_tokens] == want["completion_token_ids"].to_pylist()
        assert [t.tolist() for t in s.token_logprobs] == want["token_logprobs"].to_pylist()
        assert [t.tolist() for t in s.topk_ids] == want["topk_token_ids"].to_pylist()
        assert all(
            t.dtype == np.float32 and t.shape == (len(c), 3)
            for t, c in zip(s.topk_logprobs, s.completion_tokens, strict=True)
        )
    limited = load_samples(tmp_path, split="heldout", limit_prompts=4)
    assert limited.prompt_ids == load_samples(tmp_path, split="heldout").prompt_ids[:4]
    with pytest.raises(DatasetError, match="no heldout samples"):
        small_dataset(tmp_path / "none", heldout=0.0)
        load_samples(tmp_path / "none", split="heldout")
