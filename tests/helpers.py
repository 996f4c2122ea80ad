"""Helpers shared by test files (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from pipeline.core import stable_id
from pipeline.dataset.schema import Generation, Manifest, SamplingRecord, StorageRecord, TeacherRecord, build_table
from pipeline.dataset.writer import commit_shard, write_manifest, write_shard

TEACHER_PYTHON = os.environ.get(
    "DISTILL_TEACHER_PYTHON", str(Path(__file__).resolve().parent.parent / ".venv-teacher/bin/python")
)
"""The vLLM teacher environment's Python (`make teacher-env`); tests that start vLLM skip without it."""
needs_vllm = pytest.mark.skipif(
    not Path(TEACHER_PYTHON).exists(),
    reason=f"no vLLM teacher environment at {TEACHER_PYTHON} (run `make teacher-env`)",
)


def one_line_error(result, fragment: str) -> str:
    """Assert a CliRunner result is exit 1 with a single `error:` line holding `fragment`, no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert fragment in lines[0], result.output
    return lines[0]


def copy_dataset(dataset_dir: Path, dst: Path) -> Path:
    """A copy of a dataset directory to damage or extend without touching the shared one."""
    import shutil

    shutil.copytree(dataset_dir, dst)
    return dst


def write_config(path: Path, raw: dict) -> Path:
    """A raw config dict written as YAML at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


@dataclass
class Rows:
    """A dataset's committed rows read straight from Parquet (independent of the library's reader)."""

    prompt_ids: list[str]
    prompt_tokens: list[np.ndarray]
    completion_tokens: list[np.ndarray]
    token_logprobs: list[np.ndarray]
    topk_ids: list[np.ndarray]
    topk_logprobs: list[np.ndarray]
    finish_reasons: list[str]

    def __len__(self) -> int:
        return len(self.prompt_ids)


def read_rows(dataset_dir: Path) -> Rows:
    """Every committed row, in manifest order, as per-sample numpy arrays ([L] and [L, k])."""
    manifest = json.loads((Path(dataset_dir) / "manifest.json").read_text())
    rows = [r for s in manifest["shards"] for r in pq.read_table(Path(dataset_dir) / s["file"]).to_pylist()]
    k = manifest["k"]
    return Rows(
        prompt_ids=[r["prompt_id"] for r in rows],
        prompt_tokens=[np.asarray(r["prompt_token_ids"], np.int64) for r in rows],
        completion_tokens=[np.asarray(r["completion_token_ids"], np.int64) for r in rows],
        token_logprobs=[np.asarray(r["token_logprobs"], np.float32) for r in rows],
        topk_ids=[np.asarray(r["topk_token_ids"], np.int64).reshape(-1, k) for r in rows],
        topk_logprobs=[np.asarray(r["topk_logprobs"], np.float32).reshape(-1, k) for r in rows],
        finish_reasons=[r["finish_reason"] for r in rows],
    )


def server_config(model: Path, **kw):
    """A managed vLLM server for the tiny teacher; eager mode skips torch.compile (~20 s of each start on 2 cores)."""
    from pipeline.config import VLLMServerTeacherConfig

    kw = {
        "extra_args": ["--enforce-eager"],
        "python": TEACHER_PYTHON,
        "dtype": "float32",
        "max_model_len": 128,
        "gpu_memory_utilization": 0.3,
        "cpu_kvcache_space_gb": 1,
        "startup_timeout_s": 300,
        "concurrency": 16,
        "max_retries": 1,
        **kw,
    }
    return VLLMServerTeacherConfig(model=str(model), **kw)


def fake_generation(rng, length: int, k: int, vocab: int):
    """A completion of `length` tokens with the exact top-k of random logits over `vocab`."""
    logits = rng.normal(size=(length, vocab))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ids = np.argsort(-logp, axis=1)[:, :k].astype(np.int32)
    sampled = rng.integers(0, vocab, size=length).astype(np.int32)
    return Generation(
        sampled,
        np.take_along_axis(logp, sampled[:, None], 1)[:, 0].astype(np.float32),
        ids,
        np.take_along_axis(logp, ids, 1).astype(np.float32),
        "length",
    )


def tiny_manifest(num_shards: int = 1, k: int = 4, vocab: int = 50, *, teacher_model: str = "m", **fields) -> Manifest:
    """A manifest for hand-built shards (default: 3 prompts per shard, n=2); `fields` override any other field,
    `sampling` given as a dict of the fields that differ."""
    sampling = {"temperature": 1, "top_p": 1, "max_new_tokens": 8, "n": 2, "seed": 0, **fields.pop("sampling", {})}
    base = {"prompts_source": "p", "num_prompts": 3, "shard_size": 3, **fields}
    return Manifest(
        teacher=TeacherRecord(model=teacher_model, backend="hf", vocab_size=vocab),
        tokenizer_fingerprint="t",
        k=k,
        sampling=SamplingRecord(**sampling),
        prompts_fingerprint="p",
        generate_fingerprint="g",
        config_hash="c",
        num_shards=num_shards,
        **base,
    )


def refuse_teacher(monkeypatch) -> None:
    """Make starting the in-process teacher fail the test (runs that must not reach the teacher)."""
    from pipeline.teachers.hf import HFTeacher

    def refuse(self, cfg):
        raise AssertionError("the teacher was started")

    monkeypatch.setattr(HFTeacher, "__init__", refuse)


FIELDS = ("input_ids", "attention_mask", "loss_mask", "labels", "topk_ids", "topk_logprobs")


def small_dataset(
    tmp_path, *, shards=3, rows_per_shard=23, row_group_size=5, heldout=0.3, k=3, vocab=40, split_layout=True
) -> Manifest:
    """A small dataset with several row groups per shard; sample i's prompt is [i+1] so batches identify samples.
    `split_layout=False`: training and held-out rows interleaved, as written before `heldout_row_groups`."""
    rng = np.random.default_rng(0)
    tmp_path.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(
        teacher=TeacherRecord(model="m", backend="hf", vocab_size=vocab),
        tokenizer_fingerprint="t",
        k=k,
        sampling=SamplingRecord(temperature=1, top_p=1, max_new_tokens=6, n=1, seed=0),
        prompts_source="p",
        prompts_fingerprint="p",
        generate_fingerprint="g",
        config_hash="c",
        num_prompts=shards * rows_per_shard,
        shard_size=rows_per_shard,
        num_shards=shards,
        heldout_fraction=heldout,
        storage=StorageRecord(row_group_size=row_group_size, heldout_row_groups=split_layout),
    )
    write_manifest(tmp_path, manifest)
    for s in range(shards):
        ids = list(range(s * rows_per_shard, (s + 1) * rows_per_shard))
        gens = []
        for _ in ids:
            length = int(rng.integers(1, 6))
            lp = np.sort(np.log(rng.dirichlet(np.ones(vocab), length)), axis=1)[:, ::-1][:, :k].astype(np.float32)
            gens.append(
                [
                    Generation(
                        rng.integers(0, vocab, length).astype(np.int32),
                        lp[:, 0].copy(),
                        rng.integers(0, vocab, (length, k)).astype(np.int32),
                        lp,
                        "length",
                    )
                ]
            )
        table = build_table(
            prompt_ids=[stable_id("p", i) for i in ids],
            prompts=[""] * len(ids),
            prompt_token_ids=[[i + 1] for i in ids],
            generations=gens,
            completions=[[""]] * len(ids),
            seed=0,
        )
        commit_shard(
            tmp_path,
            manifest,
            write_shard(tmp_path, s, table, prompts=len(ids), storage=manifest.storage, heldout_fraction=heldout),
        )
    return manifest


def sample_ids(batch) -> list[int]:
    """The sample numbers of a batch of `small_dataset` (prompt [i+1] -> i)."""
    return (batch.input_ids[:, 0] - 1).tolist()


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# what `accelerate launch --use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP` exports
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP"}


def train_cli(config: Path, dataset: str, *, launcher=(sys.executable,), env=None, resume=False):
    """`distill train` in a subprocess (one process, or `launcher` such as TORCHRUN); asserts it exits 0."""
    cmd = [
        *launcher,
        "-m",
        "pipeline.cli",
        "train",
        str(config),
        "--dataset",
        dataset,
        *(["--resume"] if resume else []),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


WORDS = [f"w{i}" for i in range(27)]
"""The words of `word_tokenizer` (ids 3..29)."""


def word_tokenizer(out: Path):
    """A word-level tokenizer of 3 specials (<bos> <eos> <pad>) and WORDS, saved to `out`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<bos>", "<eos>", "<pad>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(out)
    return fast


def tiny_llama(out: Path, rows: int, seed: int) -> Path:
    """A tiny random Llama with `rows` embedding rows and the tokenizer, saved to `out`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=rows,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a large spread, so the random teacher puts real mass on its padding rows
        model.lm_head.weight.mul_(50.0)
    model.save_pretrained(out)
    word_tokenizer(out)
    return out


def model_with_another_tokenizer(path: Path) -> Path:
    """A tiny Llama with a 3-token tokenizer of its own, saved at `path` (not the demo tokenizer: a mismatch)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<e>": 2}, unk_token="a"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<e>", pad_token="<e>").save_pretrained(path)
    LlamaForCausalLM(
        LlamaConfig(vocab_size=3, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(path)
    return path
