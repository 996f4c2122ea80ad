"""A split as per-sample numpy arrays (`load_samples`), for tests and tools that index samples one by one.

It reads through the stream's units (`TrainStream.tables`: same shards, split and prompt limit); training and
evaluation never load a split whole, they stream it (pipeline/dataset/stream.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.dataset.batch import Rows
from pipeline.dataset.stream import STREAM_COLUMNS, TrainStream

TOKEN_COLUMNS = ["prompt_id", "prompt", "token_logprobs", *STREAM_COLUMNS]


@dataclass
class Samples:
    """Samples of one split as numpy arrays; topk arrays are [L_i, k] per sample."""

    prompt_ids: list[str]
    prompts: list[str]
    prompt_tokens: list[np.ndarray]
    completion_tokens: list[np.ndarray]
    token_logprobs: list[np.ndarray]
    topk_ids: list[np.ndarray]
    topk_logprobs: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.prompt_ids)


def load_samples(dataset_dir: Path, *, split: str = "all", limit_prompts: int | None = None) -> Samples:
    """`train`, `heldout` or `all` samples in file order; the split is by prompt id (manifest's heldout_fraction),
    `limit_prompts` keeps the split's first that many prompts. A split with no samples is a DatasetError."""
    stream = TrainStream(dataset_dir, split=split, batch_size=1, pad_id=0)
    table = pa.concat_tables(stream.tables(TOKEN_COLUMNS, limit_prompts=limit_prompts), promote_options="permissive")
    rows = Rows.from_table(table, stream.k)
    token_lp = pc.list_flatten(table["token_logprobs"]).to_numpy()
    cut = rows.completion_offsets[1:-1]
    return Samples(
        prompt_ids=table["prompt_id"].to_pylist(),
        prompts=table["prompt"].to_pylist(),
        prompt_tokens=np.split(rows.prompt, rows.prompt_offsets[1:-1]),
        completion_tokens=np.split(rows.completion, cut),
        token_logprobs=np.split(token_lp, cut),
        topk_ids=np.split(rows.topk_ids, cut),
        topk_logprobs=np.split(rows.topk_logprobs.astype(np.float32), cut),
    )


def longest_sample(dataset_dir: Path) -> int:
    """Tokens in the dataset's longest prompt + completion (both splits), reading only the two token-id columns."""
    stream = TrainStream(dataset_dir, split="all", batch_size=1, pad_id=0)
    longest = 0
    for table in stream.tables(["prompt_token_ids", "completion_token_ids"]):
        lengths = pc.add(
            pc.list_value_length(table["prompt_token_ids"]), pc.list_value_length(table["completion_token_ids"])
        )
        longest = max(longest, pc.max(lengths).as_py() or 0)
    return longest
