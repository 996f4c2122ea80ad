"""Bad input through the CLI: one clear line, exit code 1, no traceback, nothing already written lost."""

import json
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import raw_config
from tests.helpers import one_line_error

runner = CliRunner()


def _write(tmp_path, raw, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def raw(tiny_teacher, prompts_file, tmp_path):
    return raw_config(tiny_teacher, prompts_file, tmp_path / "run")


def test_unknown_key(raw, tmp_path):
    raw["generate"]["topk"] = 5
    one_line_error(runner.invoke(app, ["generate", str(_write(tmp_path, raw))]), "unknown config key 'generate.topk'")


def test_wrong_type_via_override(raw, tmp_path):
    one_line_error(
        runner.invoke(app, ["generate", str(_write(tmp_path, raw)), "--set", "generate.n=two"]), "'generate.n'"
    )


def test_missing_model_path(raw, tmp_path):
    raw["teacher"]["model"] = str(tmp_path / "no-such-model")
    one_line_error(runner.invoke(app, ["generate", str(_write(tmp_path, raw))]), "does not exist")


def test_missing_config_file(tmp_path):
    one_line_error(runner.invoke(app, ["run", str(tmp_path / "nope.yaml")]), "not found")


def test_empty_prompts_file(raw, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    raw["prompts"]["path"] = str(tmp_path / "empty.jsonl")
    one_line_error(runner.invoke(app, ["generate", str(_write(tmp_path, raw))]), "the prompts file is empty")


def test_malformed_jsonl_names_the_line(raw, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "pick: a b c d e f ="}\n{"prompt": oops}\n')
    raw["prompts"]["path"] = str(bad)
    one_line_error(runner.invoke(app, ["generate", str(_write(tmp_path, raw))]), "bad.jsonl:2: malformed JSON")


def test_tokenizer_mismatch_before_anything_runs(raw, tmp_path, generated):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    other = tmp_path / "other-student"
    PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<e>": 1}, unk_token="a")), eos_token="<e>"
    ).save_pretrained(other)
    raw["student"] = {"model": str(other)}
    shutil.copytree(generated.dataset_dir, tmp_path / "run/dataset")
    before = sorted(p.name for p in (tmp_path / "run/dataset/shards").iterdir())
    one_line_error(runner.invoke(app, ["train", str(_write(tmp_path, raw))]), "different tokenizer")
    assert sorted(p.name for p in (tmp_path / "run/dataset/shards").iterdir()) == before
    assert not (tmp_path / "run/student").exists()


def test_validate_ok_and_damaged(generated, tmp_path):
    ok = runner.invoke(app, ["validate", str(generated.dataset_dir)])
    assert ok.exit_code == 0 and "ok" in ok.output and "96 samples" in ok.output
    ds = tmp_path / "ds"
    shutil.copytree(generated.dataset_dir, ds)
    manifest = json.loads((ds / "manifest.json").read_text())
    manifest["shards"][0]["rows"] += 1
    (ds / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(runner.invoke(app, ["validate", str(ds)]), "rows but the manifest says")


def test_generate_command_reuses_a_complete_dataset(raw, tmp_path, generated):
    shutil.copytree(generated.dataset_dir, tmp_path / "run/dataset")
    result = runner.invoke(app, ["generate", str(_write(tmp_path, raw))])
    assert result.exit_code == 0, result.output
    assert "already complete, teacher not started" in result.output


def test_k_above_the_teachers_vocabulary_is_one_line_and_writes_nothing(raw, tmp_path):
    raw["generate"]["k"] = 500  # the tiny teacher has 287 tokens
    one_line_error(
        runner.invoke(app, ["generate", str(_write(tmp_path, raw))]), "generate.k=500 is larger than the teacher's"
    )
    assert not (tmp_path / "run" / "dataset" / "manifest.json").exists()


def test_output_dir_that_is_a_file_is_one_line(raw, tmp_path):
    (tmp_path / "taken").write_text("a file, not a directory")
    raw["output_dir"] = str(tmp_path / "taken" / "run")
    one_line_error(runner.invoke(app, ["generate", str(_write(tmp_path, raw))]), "is a file")
    raw["output_dir"] = str(tmp_path / "taken")
    one_line_error(runner.invoke(app, ["run", str(_write(tmp_path, raw))]), "is a file")


def test_a_bug_keeps_its_traceback(raw, tmp_path, monkeypatch):
    """Only user errors become one line: anything else is a bug and must show where it happened."""
    import pipeline.generate

    def broken(*_a, **_kw):
        raise ValueError("an internal shape bug")

    monkeypatch.setattr(pipeline.generate, "plan_dataset", broken)
    result = runner.invoke(app, ["generate", str(_write(tmp_path, raw))])
    assert result.exit_code != 0 and isinstance(result.exception, ValueError), result.output
    assert "error:" not in result.output


def test_task_runner_choices_are_one_line(raw, tmp_path):
    cfg = str(_write(tmp_path, raw))
    one_line_error(runner.invoke(app, ["run", cfg, "--task-runner", "dask"]), "unknown task runner 'dask'")
    one_line_error(runner.invoke(app, ["run", cfg, "--ray-address", "auto"]), "--ray-address needs --task-runner ray")
