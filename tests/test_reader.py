"""Streaming reader: vectorised collation, every sample once per epoch, exact resume from a saved position."""

from collections import Counter

import numpy as np
import pytest
import torch

from pipeline.dataset.reader import Rows, TrainStream, collate, collate_rows, load_samples
from pipeline.dataset.schema import Manifest, SamplingRecord, StorageRecord, TeacherRecord, build_table, stable_id
from pipeline.dataset.writer import commit_shard, write_manifest, write_shard
from pipeline.prompts import is_heldout
from pipeline.teachers.base import Generation

FIELDS = ("input_ids", "attention_mask", "loss_mask", "labels", "topk_ids", "topk_logprobs")


def test_collate_rows_on_a_hand_built_example():
    # sample 0: prompt [1, 2], completion [3, 4, 5]; sample 1: prompt [6], completion [7]; k = 2
    rows = Rows(prompt=np.array([1, 2, 6], np.int32), prompt_offsets=np.array([0, 2, 3]),
                completion=np.array([3, 4, 5, 7], np.int32), completion_offsets=np.array([0, 3, 4]),
                topk_ids=np.array([[3, 9], [4, 9], [5, 9], [7, 8]], np.int32),
                topk_logprobs=np.array([[-0.5, -1], [-0.25, -2], [-0.125, -3], [-1, -1.5]], np.float16))
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


def test_collate_rows_matches_collate_on_generated_data(generated):
    s = load_samples(generated.dataset_dir)
    idx = [5, 0, 17, 3]
    rows = Rows(np.concatenate([s.prompt_tokens[i] for i in idx]), np.cumsum([0] + [len(s.prompt_tokens[i]) for i in idx]),
                np.concatenate([s.completion_tokens[i] for i in idx]), np.cumsum([0] + [len(s.completion_tokens[i]) for i in idx]),
                np.concatenate([s.topk_ids[i] for i in idx]), np.concatenate([s.topk_logprobs[i] for i in idx]))
    a, b = collate(s, idx, pad_id=0), collate_rows(rows, pad_id=0)
    for f in FIELDS:
        assert torch.equal(getattr(a, f), getattr(b, f)), f


def _dataset(tmp_path, *, shards=3, rows_per_shard=23, row_group_size=5, heldout=0.3, k=3, vocab=40):
    """A small dataset with several row groups per shard; sample i's prompt is [i+1] so batches identify samples."""
    rng = np.random.default_rng(0)
    manifest = Manifest(teacher=TeacherRecord(model="m", backend="hf", vocab_size=vocab), tokenizer_fingerprint="t", k=k,
                        sampling=SamplingRecord(temperature=1, top_p=1, max_new_tokens=6, n=1, seed=0), prompts_source="p",
                        prompts_fingerprint="p", generate_fingerprint="g", config_hash="c", num_prompts=shards * rows_per_shard,
                        shard_size=rows_per_shard, num_shards=shards, heldout_fraction=heldout,
                        storage=StorageRecord(row_group_size=row_group_size))
    write_manifest(tmp_path, manifest)
    for s in range(shards):
        ids = list(range(s * rows_per_shard, (s + 1) * rows_per_shard))
        gens = []
        for _ in ids:
            length = int(rng.integers(1, 6))
            lp = np.sort(np.log(rng.dirichlet(np.ones(vocab), length)), axis=1)[:, ::-1][:, :k].astype(np.float32)
            gens.append([Generation(rng.integers(0, vocab, length).astype(np.int32), lp[:, 0].copy(),
                                    rng.integers(0, vocab, (length, k)).astype(np.int32), lp, "length")])
        table = build_table(prompt_ids=[stable_id("p", i) for i in ids], prompts=[""] * len(ids),
                            prompt_token_ids=[[i + 1] for i in ids], generations=gens, completions=[[""]] * len(ids), seed=0)
        commit_shard(tmp_path, manifest, write_shard(tmp_path, s, table, prompts=len(ids), storage=manifest.storage))
    return manifest


def _sample_ids(batch) -> list[int]:
    return (batch.input_ids[:, 0] - 1).tolist()


def test_every_train_sample_exactly_once_per_epoch(tmp_path):
    manifest = _dataset(tmp_path)
    train = {i for i in range(69) if not is_heldout(stable_id("p", i), manifest.heldout_fraction)}
    assert 30 < len(train) < 69
    stream = TrainStream(tmp_path, batch_size=4, pad_id=0, seed=3, shuffle_rows=12)
    assert stream.num_samples == len(train) and len(stream.units) == 15 and len(stream.windows(0)) == 5
    it = stream.batches()
    epochs = []
    for _ in range(2):
        batches = [next(it) for _ in range(stream.batches_per_epoch)]
        assert [b.input_ids.shape[0] for b in batches[:-1]] == [4] * (len(batches) - 1)
        ids = [i for b in batches for i in _sample_ids(b)]
        assert Counter(ids) == Counter(train)
        epochs.append(ids)
    assert stream.position == {"epoch": 1, "batch": stream.batches_per_epoch}
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    held = TrainStream(tmp_path, split="heldout", batch_size=50, pad_id=0, seed=3)
    assert set(_sample_ids(next(held.batches()))) == set(range(69)) - train


def test_resume_from_any_position_gives_the_same_batches(tmp_path):
    _dataset(tmp_path)
    make = lambda: TrainStream(tmp_path, batch_size=5, pad_id=0, seed=7, shuffle_rows=9)  # noqa: E731
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
    assert [_sample_ids(next(other)) for _ in range(3)] != [_sample_ids(ref[j]) for j in range(3)]


def test_bad_position_and_empty_split_are_one_line_errors(tmp_path):
    _dataset(tmp_path, heldout=0.0)
    stream = TrainStream(tmp_path, batch_size=5, pad_id=0)
    with pytest.raises(ValueError, match="outside an epoch"):
        next(stream.batches(start={"epoch": 0, "batch": stream.batches_per_epoch + 1}))
    with pytest.raises(ValueError, match="no heldout samples"):
        TrainStream(tmp_path, split="heldout", batch_size=5, pad_id=0)
