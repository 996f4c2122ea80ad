"""Bad input the other test files do not already try: one clear line, exit 1, no traceback unless --debug.

Already covered elsewhere (and listed in docs/reliability.md): empty prompts file, malformed
JSONL line, wrong type, missing model path, tokenizer mismatch (tests/test_cli.py); YAML syntax error and
unknown key with a suggestion at the API (tests/test_config.py); k above --max-logprobs
(tests/teachers/test_vllm_server.py); damaged, truncated, missing shards and a newer schema at the API
(tests/dataset/test_validate.py).
"""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import ConfigError
from pipeline.dataset.schema import read_manifest
from tests.helpers import one_line_error, write_config

runner = CliRunner()


@pytest.fixture
def config(fault_raw, tmp_path):
    """Write a config for output dir tmp_path/run; keyword sections override the fault defaults."""

    def make(raw: dict | None = None, **sections):
        return write_config(tmp_path / "cfg.yaml", raw or fault_raw(tmp_path / "run", **sections))

    return make


def test_prompts_file_that_is_not_utf8(config, tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"prompt": "pick: a b c d e f ="}\n{"prompt": "café"}\n'.encode("latin-1"))
    one_line_error(runner.invoke(app, ["generate", str(config(prompts={"path": str(bad)}))]), "not UTF-8")


def test_empty_and_overlong_prompts_are_skipped_and_counted_in_the_manifest(config, fault_prompts, tmp_path):
    prompts = tmp_path / "mixed.jsonl"
    extra = [
        json.dumps({"prompt": ""}),
        json.dumps({"prompt": "   "}),
        json.dumps({"prompt": "pick: " + "a b " * 40 + "="}),
    ]
    prompts.write_text(fault_prompts.read_text() + "\n".join(extra) + "\n")
    cfg = config(prompts={"path": str(prompts), "max_prompt_tokens": 24})
    result = runner.invoke(app, ["generate", str(cfg)])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "run/dataset")
    assert manifest.skipped_prompts == {"empty": 2, "too_long": 1}
    assert manifest.num_prompts == manifest.total_samples == 12


def test_on_invalid_fail_stops_at_the_first_bad_prompt_before_the_teacher_runs(config, fault_prompts, tmp_path):
    prompts = tmp_path / "mixed.jsonl"
    n = len(fault_prompts.read_text().splitlines())
    prompts.write_text(fault_prompts.read_text() + json.dumps({"prompt": "pick: " + "a b " * 40 + "="}) + "\n")
    cfg = config(prompts={"path": str(prompts), "max_prompt_tokens": 24, "on_invalid": "fail"})
    line = one_line_error(runner.invoke(app, ["generate", str(cfg)]), f"prompt {n + 1} is")
    assert "over prompts.max_prompt_tokens=24" in line and "on_invalid: skip" in line
    assert not (tmp_path / "run/dataset/manifest.json").exists()


def test_yaml_syntax_error_through_the_cli(config, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("teacher:\n  model: x\n  backend: [hf\nprompts: {}\n")
    one_line_error(runner.invoke(app, ["generate", str(path)]), "YAML syntax error at line")


def test_unknown_key_through_the_cli_suggests_the_closest(config, fault_raw, tmp_path):
    raw = fault_raw(tmp_path / "run")
    raw["train"]["lerning_rate"] = 1e-3
    raw["generate"]["shard_sise"] = 4
    line = one_line_error(runner.invoke(app, ["train", str(config(raw))]), "unknown config key")
    assert "did you mean 'generate.shard_size'?" in line


def test_debug_shows_the_traceback(config, tmp_path):
    result = runner.invoke(app, ["--debug", "generate", str(config(generate={"k": "many"}))])
    assert result.exit_code != 0 and isinstance(result.exception, ConfigError)


def _dataset_copy(reference, tmp_path):
    dst = tmp_path / "run/dataset"
    shutil.copytree(reference, dst)
    return dst


def test_dataset_from_a_newer_schema_version(config, reference, tmp_path):
    dataset = _dataset_copy(reference, tmp_path)
    raw = json.loads((dataset / "manifest.json").read_text())
    raw["schema_version"] = 2
    (dataset / "manifest.json").write_text(json.dumps(raw))
    one_line_error(
        runner.invoke(app, ["validate", str(dataset)]), "schema_version 2 is newer than this distill supports"
    )
    one_line_error(runner.invoke(app, ["train", str(config())]), "schema_version 2 is newer")
    assert not (tmp_path / "run/student").exists()


def _flip_a_byte(dataset):
    shard = dataset / "shards/part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))


def test_validate_reports_a_shard_whose_checksum_does_not_match(reference, tmp_path):
    dataset = _dataset_copy(reference, tmp_path)
    _flip_a_byte(dataset)
    one_line_error(
        runner.invoke(app, ["validate", str(dataset)]), "part-00001.parquet does not match its manifest checksum"
    )


def test_train_refuses_a_shard_whose_checksum_does_not_match(config, reference, tmp_path):
    dataset = _dataset_copy(reference, tmp_path)
    _flip_a_byte(dataset)
    one_line_error(runner.invoke(app, ["train", str(config(train={"max_steps": 1}))]), "checksum")
    assert not (tmp_path / "run/student/model.safetensors").exists()
