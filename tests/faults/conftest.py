"""Fixtures of the fault tests: a 12-prompt run in 4 shards (cheap to regenerate) and its uninterrupted reference."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import raw_config


@pytest.fixture(scope="session")
def fault_prompts(prompts_file, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fault-data") / "prompts.jsonl"
    path.write_text("".join(prompts_file.read_text().splitlines(keepends=True)[:12]))
    return path


@pytest.fixture(scope="session")
def fault_raw(tiny_teacher, fault_prompts):
    """A raw config dict for output dir `out`: 12 prompts, 3 per shard."""

    def make(out: Path, **sections) -> dict:
        return raw_config(tiny_teacher, fault_prompts, out, **{"generate": {"shard_size": 3}, **sections})

    return make


@pytest.fixture(scope="session")
def reference(fault_raw, tmp_path_factory) -> Path:
    """The dataset an uninterrupted run makes (in-process; shards are bit-identical to a subprocess's)."""
    from pipeline.config import build_config
    from pipeline.generate import generate_dataset

    cfg = build_config(fault_raw(tmp_path_factory.mktemp("reference") / "run"))
    generate_dataset(cfg, progress=False)
    return cfg.dataset_dir
