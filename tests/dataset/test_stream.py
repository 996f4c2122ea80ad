"""The one reader (pipeline/dataset/stream.py): vectorised collation, every sample once per epoch, exact resume
from a saved position, and the in-order pass evaluation reads the held-out split with."""

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.core import heldout_mask, is_heldout, stable_id
from pipeline.dataset.batch import Batch, Rows, collate_rows
from pipeline.dataset.schema import DatasetError, committed_shards, read_manifest
from pipeline.dataset.stream import TrainStream
from tests.helpers import FIELDS, sample_ids, small_dataset


def _reference_split(dataset_dir, split="all", limit_prompts=None) -> pa.Table:
    """The split read whole with plain pyarrow (what evaluation loaded before it streamed): file order, then the
    split's first `limit_prompts` prompt ids and every row of theirs."""
    manifest = read_manifest(dataset_dir)
    tables = [pq.read_table(p) for p in committed_shards(dataset_dir, manifest)]
    table = pa.concat_tables(tables, promote_options="permissive")
    if split != "all":
        keep = heldout_mask(table["prompt_id"], manifest.heldout_fraction) == (split == "heldout")
        table = table.filter(pa.array(keep, pa.bool_()))
    if limit_prompts is not None:
        first = list(dict.fromkeys(table["prompt_id"].to_pylist()))[:limit_prompts]
        table = table.filter(pc.is_in(table["prompt_id"], pa.array(first, pa.string())))
    return table


def _reference_collate(table: pa.Table, pad_id: int) -> Batch:
    """Per-sample, loop-by-loop collation (the evaluation reader's old `collate`): the oracle for the vectorised one."""
    prompts = [np.asarray(p, np.int64) for p in table["prompt_token_ids"].to_pylist()]
    comps = [np.asarray(c, np.int64) for c in table["completion_token_ids"].to_pylist()]
    seqs = [np.concatenate([p, c]) for p, c in zip(prompts, comps, strict=True)]
    width = max(len(s) for s in seqs)
    input_ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    attention = np.zeros((len(seqs), width), dtype=np.int64)
    loss_mask = np.zeros((len(seqs), width), dtype=bool)
    for row, (p, c, seq) in enumerate(zip(prompts, comps, seqs, strict=True)):
        input_ids[row, : len(seq)] = seq
        attention[row, : len(seq)] = 1
        loss_mask[row, len(p) - 1 : len(p) - 1 + len(c)] = True
    k = read_k(table)
    ids = np.concatenate([np.asarray(x, np.int64).reshape(-1, k) for x in table["topk_token_ids"].to_pylist()])
    lps = np.concatenate([np.asarray(x, np.float32).reshape(-1, k) for x in table["topk_logprobs"].to_pylist()])
    return Batch(
        torch.from_numpy(input_ids),
        torch.from_numpy(attention),
        torch.from_numpy(loss_mask),
        torch.from_numpy(np.concatenate(comps)),
        torch.from_numpy(ids),
        torch.from_numpy(lps),
    )


def read_k(table: pa.Table) -> int:
    return len(table["topk_token_ids"][0][0])


def _assert_same_batch(a: Batch, b: Batch) -> None:
    for f in FIELDS:
        assert torch.equal(getattr(a, f), getattr(b, f)), f


def test_collate_rows_on_a_hand_built_example():
    # sample 0: prompt [1, 2], completion [3, 4, 5]; sample 1: prompt [6], completion [7]; k = 2
    rows = Rows(
        prompt=np.array([1, 2, 6], np.int32),
        prompt_offsets=np.array([0, 2, 3]),
        completion=np.array([3, 4, 5, 7], np.int32),
        completion_offsets=np.array([0, 3, 4]),
        topk_ids=np.array([[3, 9], [4, 9], [5, 9], [7, 8]], np.int32),
        topk_logprobs=np.array([[-0.5, -1], [-0.25, -2], [-0.125, -3], [-1, -1.5]], np.float16),
    )
    b = collate_rows(rows, pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert b.loss_mask.tolist() == [[False, True, True, True, False], [True, False, False, False, False]]
    assert b.labels.tolist() == [3, 4, 5, 7] and b.input_ids[:, 1:][b.loss_mask[:, :-1]].tolist() == [3, 4, 5, 7]
    assert b.topk_ids.dtype == torch.int64 and b.topk_ids.shape == (4, 2) and b.topk_ids[:, 0].tolist() == [3, 4, 5, 7]
    assert b.topk_logprobs.dtype == torch.float32 and b.topk_logprobs[2].tolist() == [-0.125, -3]
    # take + slice + concat keep samples whole and in the asked order
    swapped = Rows.concat([rows.take(np.array([1])), rows.slice(0, 1)])
    assert collate_rows(swapped, 0).input_ids.tolist() == [[6, 7, 0, 0, 0], [1, 2, 3, 4, 5]]


def test_collate_rows_matches_per_sample_collation_on_generated_data(generated):
    table = _reference_split(generated.dataset_dir)
    idx = [5, 0, 17, 3]
    picked = table.take(pa.array(idx))
    _assert_same_batch(collate_rows(Rows.from_table(picked, read_k(table)), pad_id=0), _reference_collate(picked, 0))


@pytest.mark.parametrize("split_layout", [True, False])
def test_every_train_sample_exactly_once_per_epoch(tmp_path, split_layout):
    manifest = small_dataset(tmp_path, split_layout=split_layout)
    train = {i for i in range(69) if not is_heldout(stable_id("p", i), manifest.heldout_fraction)}
    assert 30 < len(train) < 69
    stream = TrainStream(tmp_path, batch_size=4, pad_id=0, seed=3, shuffle_rows=12)
    # interleaved: all 15 row groups (5 a shard) hold training rows; split: only ceil(train rows / 5) a shard do
    per_shard = [sum(1 for i in train if 23 * s <= i < 23 * (s + 1)) for s in range(3)]
    assert sum(1 for u in stream.units if u.kept) == (sum(-(-n // 5) for n in per_shard) if split_layout else 15)
    assert stream.num_samples == len(train)
    if not split_layout:
        assert len(stream.windows(0)) == 5  # 15 row groups of 5 rows, windows of >= 12 rows
    it = stream.batches()
    epochs = []
    for _ in range(2):
        batches = [next(it) for _ in range(stream.batches_per_epoch)]
        assert [b.input_ids.shape[0] for b in batches[:-1]] == [4] * (len(batches) - 1)
        ids = [i for b in batches for i in sample_ids(b)]
        assert Counter(ids) == Counter(train)
        epochs.append(ids)
    assert stream.position == {"epoch": 1, "batch": stream.batches_per_epoch}
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    held = TrainStream(tmp_path, split="heldout", batch_size=50, pad_id=0, seed=3)
    assert set(sample_ids(next(held.batches()))) == set(range(69)) - train


def test_resume_from_any_position_gives_the_same_batches(tmp_path):
    small_dataset(tmp_path)
    make = lambda: TrainStream(tmp_path, batch_size=5, pad_id=0, seed=7, shuffle_rows=9)
    ref_stream = make()
    it = ref_stream.batches()
    total = 2 * ref_stream.batches_per_epoch + 3  # across two epoch boundaries
    ref, positions = [], []
    for _ in range(total):
        ref.append(next(it))
        positions.append(dict(ref_stream.position))
    for m in range(total - 1):
        resumed = make().batches(start=positions[m])
        for j in range(m + 1, min(m + 4, total)):
            got = next(resumed)
            for f in FIELDS:
                assert torch.equal(getattr(got, f), getattr(ref[j], f)), (m, j, f)
    same_seed = make().batches()
    assert all(torch.equal(next(same_seed).input_ids, ref[j].input_ids) for j in range(3))
    other = TrainStream(tmp_path, batch_size=5, pad_id=0, seed=8, shuffle_rows=9).batches()
    assert [sample_ids(next(other)) for _ in range(3)] != [sample_ids(ref[j]) for j in range(3)]


def test_bad_position_and_empty_split_are_one_line_errors(tmp_path):
    small_dataset(tmp_path, heldout=0.0)
    stream = TrainStream(tmp_path, batch_size=5, pad_id=0)
    with pytest.raises(DatasetError, match="outside an epoch"):
        next(stream.batches(start={"epoch": 0, "batch": stream.batches_per_epoch + 1}))
    with pytest.raises(DatasetError, match="no heldout samples"):
        TrainStream(tmp_path, split="heldout", batch_size=5, pad_id=0)


def test_seeded_batch_order_is_pinned(tmp_path):
    # Checkpoints store `position`, so the batch sequence for a seed is part of the contract: these ids
    # were recorded from the reader before its internals were optimised and must never change (a dataset
    # laid out before `heldout_row_groups` existed).
    small_dataset(tmp_path, split_layout=False)
    stream = TrainStream(tmp_path, batch_size=4, pad_id=0, seed=3, shuffle_rows=12)
    it = stream.batches()
    got = [sample_ids(next(it)) for _ in range(stream.batches_per_epoch + 2)]
    assert got == [
        [11, 14, 53, 13],
        [51, 52, 43, 67],
        [66, 12, 45, 55],
        [10, 3, 50, 48],
        [4, 65, 49, 63],
        [1, 46, 34, 8],
        [9, 20, 35, 33],
        [22, 36, 7, 31],
        [56, 26, 25, 57],
        [28, 30, 58, 59],
        [27, 40, 42, 15],
        [38, 17, 19, 41],
        [22, 34, 35, 20],
        [33, 3, 4, 1],
    ]
    held = TrainStream(tmp_path, split="heldout", batch_size=4, pad_id=0, seed=1, shuffle_rows=7).batches()
    assert [sample_ids(next(held)) for _ in range(4)] == [
        [5, 6, 60, 37],
        [47, 21, 24, 23],
        [68, 39, 2, 0],
        [44, 62, 54, 64],
    ]
    every = TrainStream(tmp_path, split="all", batch_size=6, pad_id=0, seed=0, shuffle_rows=1).batches()
    assert [sample_ids(next(every)) for _ in range(3)] == [
        [12, 14, 13, 10, 11, 52],
        [54, 55, 53, 51, 16, 17],
        [19, 18, 15, 46, 47, 50],
    ]
    first = next(TrainStream(tmp_path, batch_size=4, pad_id=0, seed=3, shuffle_rows=12).batches())
    assert first.labels.tolist() == [20, 11, 28, 21, 12, 23, 18, 16, 33, 29, 17, 3]
    assert first.topk_ids.sum().item() == 755 and first.topk_logprobs.sum().item() == pytest.approx(-86.2109375)


def test_gathering_collate_matches_take_then_collate_rows():
    from pipeline.dataset.batch import collate

    rng = np.random.default_rng(1)
    p_len, c_len = rng.integers(1, 5, 30), rng.integers(0, 7, 30)
    p_off, c_off = np.concatenate([[0], np.cumsum(p_len)]), np.concatenate([[0], np.cumsum(c_len)])
    rows = Rows(
        rng.integers(1, 50, p_off[-1]).astype(np.int32),
        p_off,
        rng.integers(1, 50, c_off[-1]).astype(np.int32),
        c_off,
        rng.integers(0, 50, (c_off[-1], 3)).astype(np.int32),
        rng.normal(size=(c_off[-1], 3)).astype(np.float16),
    )
    idx = rng.permutation(30)[:11]
    got, want = collate(rows, idx, pad_id=99), collate_rows(rows.take(idx), pad_id=99)
    for f in FIELDS:
        assert torch.equal(getattr(got, f), getattr(want, f)), f
    assert got.topk_logprobs.dtype == torch.float32 and got.topk_ids.dtype == torch.int64
    got.topk_logprobs.zero_()
    got.labels.zero_()
    assert rows.topk_logprobs.any() and rows.completion.all()  # the batch does not alias the window


@pytest.mark.parametrize("split_layout", [True, False])
def test_split_masks_from_footer_statistics_equal_reading_the_ids(tmp_path, monkeypatch, split_layout):
    """A row group whose prompt_id min/max fall on one side of the split is classified from the footer; mixed
    ones are read. Either way the masks equal the ids' own `heldout_mask`."""
    import pyarrow.parquet as pq

    from pipeline.core import heldout_mask

    manifest = small_dataset(tmp_path, split_layout=split_layout)
    reads = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(
        pq.ParquetFile,
        "read_row_group",
        lambda self, i, columns=None, **kw: (reads.append(columns), real(self, i, columns=columns, **kw))[1],
    )
    for split in ("train", "heldout"):
        reads.clear()
        stream = TrainStream(tmp_path, split=split, batch_size=4, pad_id=0)
        for unit in stream.units:
            ids = real(pq.ParquetFile(unit.path), unit.row_group, columns=["prompt_id"])["prompt_id"]
            held = heldout_mask(ids, manifest.heldout_fraction)
            assert unit.keep.tolist() == (held if split == "heldout" else ~held).tolist()
        mixed = sum(0 < u.kept < u.rows for u in stream.units)
        assert len(reads) == mixed  # only row groups holding both splits are read
        assert (mixed == 0) if split_layout else (mixed >= 5)


@pytest.mark.parametrize("split_layout", [True, False])
@pytest.mark.parametrize("split,limit", [("heldout", None), ("heldout", 7), ("train", 11), ("all", None)])
def test_in_order_pass_is_the_split_in_file_order_collated_as_training_does(tmp_path, split_layout, split, limit):
    """Evaluation's pass: consecutive batches of the split's rows in file order (the first `limit` prompts), each with
    the same samples' extra columns, equal to reading the split whole and collating sample by sample."""
    small_dataset(tmp_path, split_layout=split_layout)
    want = _reference_split(tmp_path, split, limit)
    stream = TrainStream(tmp_path, split=split, batch_size=4, pad_id=0)
    got = list(stream.in_order(["prompt_id", "token_logprobs"], limit_prompts=limit))
    sizes = [b.input_ids.shape[0] for b, _ in got]
    assert sizes[:-1] == [4] * (len(got) - 1) and 0 < sizes[-1] <= 4
    for i, (batch, columns) in enumerate(got):
        rows = want.slice(4 * i, 4)
        _assert_same_batch(batch, _reference_collate(rows, 0))
        assert columns.column_names == ["prompt_id", "token_logprobs"]
        assert columns["prompt_id"].to_pylist() == rows["prompt_id"].to_pylist()
        assert columns["token_logprobs"].to_pylist() == rows["token_logprobs"].to_pylist()
    assert sum(b.input_ids.shape[0] for b, _ in got) == want.num_rows
    if limit is not None:
        assert len({p for _, c in got for p in c["prompt_id"].to_pylist()}) == limit
    assert stream.position == {"epoch": 0, "batch": 0}  # the training position is not touched


def test_in_order_limit_keeps_every_row_of_the_chosen_prompts(generated):
    """On generated data (several samples a prompt when n > 1): a prompt is in or out whole."""
    want = _reference_split(generated.dataset_dir, "heldout", 5)
    stream = TrainStream(generated.dataset_dir, split="heldout", batch_size=3, pad_id=0)
    got = [pid for _, c in stream.in_order(["prompt_id"], limit_prompts=5) for pid in c["prompt_id"].to_pylist()]
    assert got == want["prompt_id"].to_pylist() and len(set(got)) == 5


def test_collate_aligns_positions_with_labels(generated):
    """Moved from tests/test_dataset.py (it collated with the removed per-sample `collate`): the first three samples."""
    batch, columns = next(
        TrainStream(generated.dataset_dir, split="all", batch_size=3, pad_id=0).in_order(["completion_token_ids"])
    )
    lengths = [len(c) for c in columns["completion_token_ids"].to_pylist()]
    assert int(batch.loss_mask.sum()) == batch.n_tokens == sum(lengths) and len(lengths) == 3
    # position t predicts token t+1: the token after each masked position is the label
    nxt = batch.input_ids[:, 1:][batch.loss_mask[:, :-1]]
    assert nxt.tolist() == batch.labels.tolist()


def test_limit_keeps_a_chosen_prompts_rows_wherever_they_lie_and_tables_read_only_the_columns_asked(tmp_path):
    """`tables(limit_prompts=...)` promises all rows of the chosen prompts "wherever they lie": a row group with
    none of them does not end the pass (here prompt a's second sample sits in the last shard, after one of b)."""
    from pipeline.dataset.schema import build_table
    from pipeline.dataset.writer import commit_shard, write_manifest, write_shard
    from tests.helpers import fake_generation, tiny_manifest

    rng = np.random.default_rng(5)
    manifest = tiny_manifest(num_shards=3, heldout_fraction=0.0)
    write_manifest(tmp_path, manifest)
    layout = [["a"], ["b"], ["a"]]
    for index, pids in enumerate(layout):
        table = build_table(
            prompt_ids=pids,
            prompts=["p"] * len(pids),
            prompt_token_ids=[[1]] * len(pids),
            generations=[[fake_generation(rng, 2, 4, 50)] for _ in pids],
            completions=[["x"]] * len(pids),
            seed=index,
        )
        shard = write_shard(tmp_path, index, table, prompts=len(pids), heldout_fraction=0.0)
        manifest = commit_shard(tmp_path, manifest, shard)
    stream = TrainStream(tmp_path, split="all", batch_size=8, pad_id=0)
    tables = list(stream.tables(["prompt_id", "prompt_token_ids"], limit_prompts=1))
    assert [t["prompt_id"].to_pylist() for t in tables] == [["a"], ["a"]]
    assert all(t.column_names == ["prompt_id", "prompt_token_ids"] for t in tables)
    assert [t.column_names for t in stream.tables(["completion_token_ids"])] == [["completion_token_ids"]] * 3


def test_the_default_window_and_seed_are_the_training_order(tmp_path):
    """Training builds its stream with the default shuffle window (4096 rows) and checkpoints store a position in
    that order, so the defaults are part of the contract: row groups join a window until it holds >= 4096 rows."""
    small_dataset(tmp_path, shards=3, rows_per_shard=2048, row_group_size=2048, heldout=0.0, k=1, vocab=8)
    default = TrainStream(tmp_path, batch_size=512, pad_id=0)
    assert [[u.rows for u in w] for w in default.windows(0)] == [[2048, 2048], [2048]]
    explicit = TrainStream(tmp_path, batch_size=512, pad_id=0, seed=0, shuffle_rows=4096)
    a, b = default.batches(), explicit.batches()
    assert all(sample_ids(next(a)) == sample_ids(next(b)) for _ in range(13))  # into the second epoch


def test_mixed_in_datasets_join_each_epoch_repeat_times_and_must_share_tokenizer_and_k(tmp_path):
    base = small_dataset(tmp_path / "base", shards=1, rows_per_shard=10, row_group_size=5, heldout=0.0)
    small_dataset(tmp_path / "other", shards=1, rows_per_shard=6, row_group_size=3, heldout=0.0)
    other = read_manifest(tmp_path / "other")
    other.generate_fingerprint = "other-key"
    from pipeline.dataset.writer import write_manifest

    write_manifest(tmp_path / "other", other)
    stream = TrainStream(tmp_path / "base", batch_size=4, pad_id=0, mix=[(tmp_path / "other", 2)])
    assert stream.num_samples == 10 + 2 * 6 and len(stream.units) == 2 + 2 * 2
    assert (
        stream.mix_fingerprints == ["other-key"] and stream.manifest.generate_fingerprint == base.generate_fingerprint
    )
    it = stream.batches()
    ids = Counter(i for _ in range(stream.batches_per_epoch) for i in sample_ids(next(it)))
    assert ids == Counter({i: 3 for i in range(6)} | {i: 1 for i in range(6, 10)})  # prompts [i+1] in both
    small_dataset(tmp_path / "wide", shards=1, rows_per_shard=4, row_group_size=4, heldout=0.0, k=5)
    with pytest.raises(DatasetError) as err:
        TrainStream(tmp_path / "base", batch_size=4, pad_id=0, mix=[(tmp_path / "wide", 1)])
    assert str(err.value) == (
        f"{tmp_path / 'wide'} cannot be mixed into {tmp_path / 'base'}: made with another tokenizer or k (5 vs 3); "
        "mix only datasets of the same teacher tokenizer and k"
    )


def test_bad_arguments_and_positions_say_what_is_wrong(tmp_path):
    small_dataset(tmp_path, heldout=0.0)
    with pytest.raises(ValueError, match=r"^split must be train, heldout or all, got 'dev'$"):
        TrainStream(tmp_path, split="dev", batch_size=4, pad_id=0)
    for kw in ({"batch_size": 0}, {"batch_size": 4, "shuffle_rows": 0}):
        with pytest.raises(ValueError, match=r"^batch_size and shuffle_rows must be >= 1$"):
            TrainStream(tmp_path, pad_id=0, **kw)
    stream = TrainStream(tmp_path, batch_size=5, pad_id=0)
    start = {"epoch": 0, "batch": stream.batches_per_epoch + 1}
    with pytest.raises(DatasetError) as err:
        next(stream.batches(start=start))
    assert str(err.value) == (
        f"position {start} is outside an epoch of {stream.batches_per_epoch} batches (another dataset or batch size?)"
    )


def test_a_shard_without_footer_statistics_is_split_by_reading_its_ids(tmp_path):
    """Parquet written elsewhere may carry no min/max statistics: the split then comes from the prompt ids."""
    from pipeline.core import sha256_file
    from pipeline.dataset.writer import write_manifest

    manifest = small_dataset(tmp_path, shards=2, rows_per_shard=12, row_group_size=4)
    for shard in manifest.shards:
        path = tmp_path / shard.file
        pq.write_table(pq.read_table(path), path, row_group_size=4, write_statistics=False)
        shard.sha256, shard.bytes = sha256_file(path), path.stat().st_size
    write_manifest(tmp_path, manifest)
    assert pq.ParquetFile(tmp_path / manifest.shards[0].file).metadata.row_group(0).column(1).statistics is None
    for split in ("train", "heldout"):
        stream = TrainStream(tmp_path, split=split, batch_size=24, pad_id=0)
        want = {
            i for i in range(24) if is_heldout(stable_id("p", i), manifest.heldout_fraction) == (split == "heldout")
        }
        assert set(sample_ids(next(stream.batches()))) == want and stream.num_samples == len(want)


def test_windows_smaller_than_a_batch_carry_their_rows_into_the_next_window(tmp_path):
    """A batch may need rows from several windows (here windows of 5 rows, batches of 12): none is dropped and the
    epoch does not end early."""
    small_dataset(tmp_path, shards=2, rows_per_shard=20, row_group_size=5, heldout=0.0)
    stream = TrainStream(tmp_path, batch_size=12, pad_id=0, shuffle_rows=1)
    it = stream.batches()
    batches = [sample_ids(next(it)) for _ in range(stream.batches_per_epoch)]
    assert [len(b) for b in batches] == [12, 12, 12, 4]
    assert sorted(i for b in batches for i in b) == list(range(40))
    assert stream.position == {"epoch": 0, "batch": 4}
