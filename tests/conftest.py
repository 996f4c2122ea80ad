"""Shared fixtures: a tiny demo teacher (briefly trained, built once per session) and run configs in tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import torch  # noqa: E402

# `make test` runs two pytest-xdist workers on the 2-core CI machine: one torch thread each, not two apiece.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A demo-task teacher trained for a few dozen steps: real tokenizer, emits EOS, not yet accurate."""
    from transformers import GenerationConfig, LlamaForCausalLM

    from pipeline.demo.build import teacher_config, train, train_tokenizer

    out = tmp_path_factory.mktemp("models") / "teacher"
    tok = train_tokenizer(out, seed=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        teacher_config(len(tok), bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    )
    train(model, tok, seed=0, max_steps=60, max_seconds=120, batch_size=32, log=lambda _m: None)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory) -> Path:
    from pipeline.demo.task import write_prompts_jsonl

    return write_prompts_jsonl(tmp_path_factory.mktemp("data") / "prompts.jsonl", 96, seed=123)


def raw_config(tiny_teacher: Path, prompts_file: Path, out: Path, **sections) -> dict:
    """A small but complete run config as a dict (sections override the defaults key by key)."""
    cfg = {
        "name": "test",
        "output_dir": str(out),
        "teacher": {"backend": "hf", "model": str(tiny_teacher), "batch_size": 64},
        "prompts": {"path": str(prompts_file), "heldout_fraction": 0.25},
        "generate": {"k": 8, "max_new_tokens": 20, "shard_size": 32, "seed": 0},
        "student": {
            "shrink": {
                "hidden_size": 64,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "head_dim": 32,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
            }
        },
        "train": {"max_steps": 6, "batch_size": 16, "lr": 3e-3, "warmup_steps": 1, "log_every": 1},
        "eval": {"task": "demo", "max_prompts": 16, "batch_size": 64},
    }
    for section, values in sections.items():
        merge = isinstance(values, dict) and section != "teacher"  # a teacher section replaces: backends differ
        cfg[section] = {**cfg.get(section, {}), **values} if merge else values
    return cfg


@pytest.fixture
def make_config(tiny_teacher, prompts_file, tmp_path):
    """Build a validated RunConfig under tmp_path; keyword sections override defaults."""
    from pipeline.config import build_config

    def make(out: Path | None = None, **sections):
        return build_config(raw_config(tiny_teacher, prompts_file, out or tmp_path / "run", **sections))

    return make


@pytest.fixture(scope="session")
def generated(tiny_teacher, prompts_file, tmp_path_factory):
    """One generated dataset shared by read-only tests (config, dataset dir)."""
    from pipeline.config import build_config
    from pipeline.generate import generate_dataset

    cfg = build_config(raw_config(tiny_teacher, prompts_file, tmp_path_factory.mktemp("gen") / "run"))
    generate_dataset(cfg, progress=False)
    return cfg


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """Prefect's local test API (ephemeral, SQLite) for one test module, under a PREFECT_HOME of its own."""
    from prefect.testing.utilities import prefect_test_harness

    old = os.environ.get("PREFECT_HOME")
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    try:
        with prefect_test_harness(server_startup_timeout=120):
            yield
    finally:
        if old is None:
            os.environ.pop("PREFECT_HOME", None)
        else:
            os.environ["PREFECT_HOME"] = old


def pytest_collection_modifyitems(config, items):
    """Tests that need the tiny teacher are marked `teacher`; tests marked `gpu` need CUDA, and on CPU-only
    machines they are skipped with the reason shown."""
    for item in items:
        if "tiny_teacher" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.teacher)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine (CPU CI runs everything else)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
