"""Shared test helpers for the reader and training tests (not fixtures: plain functions)."""

import numpy as np

from pipeline.core import stable_id
from pipeline.dataset.schema import Generation, Manifest, SamplingRecord, StorageRecord, TeacherRecord, build_table
from pipeline.dataset.writer import commit_shard, write_manifest, write_shard

FIELDS = ("input_ids", "attention_mask", "loss_mask", "labels", "topk_ids", "topk_logprobs")


def small_dataset(tmp_path, *, shards=3, rows_per_shard=23, row_group_size=5, heldout=0.3, k=3, vocab=40,
                  split_layout=True) -> Manifest:
    """A small dataset with several row groups per shard; sample i's prompt is [i+1] so batches identify samples.
    `split_layout=False`: training and held-out rows interleaved, as written before `heldout_row_groups`."""
    rng = np.random.default_rng(0)
    tmp_path.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(teacher=TeacherRecord(model="m", backend="hf", vocab_size=vocab), tokenizer_fingerprint="t",
                        k=k, sampling=SamplingRecord(temperature=1, top_p=1, max_new_tokens=6, n=1, seed=0),
                        prompts_source="p", prompts_fingerprint="p", generate_fingerprint="g", config_hash="c",
                        num_prompts=shards * rows_per_shard, shard_size=rows_per_shard, num_shards=shards,
                        heldout_fraction=heldout,
                        storage=StorageRecord(row_group_size=row_group_size, heldout_row_groups=split_layout))
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
                            prompt_token_ids=[[i + 1] for i in ids], generations=gens, completions=[[""]] * len(ids),
                            seed=0)
        commit_shard(tmp_path, manifest, write_shard(tmp_path, s, table, prompts=len(ids), storage=manifest.storage,
                                                     heldout_fraction=heldout))
    return manifest


def sample_ids(batch) -> list[int]:
    """The sample numbers of a batch of `small_dataset` (prompt [i+1] -> i)."""
    return (batch.input_ids[:, 0] - 1).tolist()
