"""Config validation at the edge: every shipped config loads; bad keys/types fail in one line."""

from pathlib import Path

import pytest

from pipeline.config import ConfigError, build_config, load_config, parse_override

CONFIGS = sorted(Path(__file__).parent.parent.glob("configs/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.generate.k >= 1 and cfg.train.max_steps >= 1


def test_demo_config_is_the_documented_default():
    cfg = load_config(Path(__file__).parent.parent / "configs/demo.yaml")
    assert cfg.generate.k == 20 and cfg.output_dir == "data/runs/demo"
    assert cfg.student.shrink is not None and cfg.student.shrink.hidden_size < 128
    assert cfg.teacher.backend == "vllm_engine"  # the fastest capture path (bench/README.md, capture)


def test_engine_backend_keys_are_checked_and_key_the_dataset():
    raw = {"teacher": {"backend": "vllm_engine", "model": "x"}, "prompts": {"path": "p"}, "student": {"model": "s"}}
    cfg = build_config(raw, ["teacher.engine_args={enforce_eager: true}"])
    assert cfg.teacher.engine_args == {"enforce_eager": True} and cfg.teacher.python == ".venv-teacher/bin/python"
    with pytest.raises(
        ConfigError, match=r"unknown config key 'teacher.engine_arg' \(did you mean 'teacher.engine_args'"
    ):
        build_config(raw, ["teacher.engine_arg={}"])
    with pytest.raises(ConfigError, match=r"unknown config key 'teacher.url'"):
        build_config(raw, ["teacher.url=http://a:8000"])  # the engine runs here; attaching is vllm_server's
    assert cfg.generate_fingerprint() != build_config(raw).generate_fingerprint()  # engine arguments change outputs


def test_unknown_key_suggests_the_closest(tmp_path):
    raw = {"teacher": {"model": "x"}, "prompts": {"path": "p"}, "student": {"model": "s"}, "train": {"alpah": 0.5}}
    with pytest.raises(ConfigError, match=r"unknown config key 'train.alpah' \(did you mean 'train.alpha'\?\)"):
        build_config(raw)


def test_wrong_type_and_range_name_the_key():
    raw = {"teacher": {"model": "x"}, "prompts": {"path": "p"}, "student": {"model": "s"}}
    with pytest.raises(ConfigError, match="'generate.k'"):
        build_config(raw, ["generate.k=many"])
    with pytest.raises(ConfigError, match="'train.alpha'"):
        build_config(raw, ["train.alpha=1.5"])
    with pytest.raises(ConfigError, match="missing required config key 'teacher'"):
        build_config({"prompts": {"path": "p"}, "student": {"model": "s"}})


def test_student_needs_exactly_one_source():
    raw = {"teacher": {"model": "x"}, "prompts": {"path": "p"}, "student": {}}
    with pytest.raises(ConfigError, match="exactly one of student.model"):
        build_config(raw)


def test_overrides_are_typed():
    raw = {"teacher": {"model": "x"}, "prompts": {"path": "p"}, "student": {"model": "s"}}
    cfg = build_config(raw, ["train.lr=1e-3", "teacher.revision=123e4567"])
    assert cfg.train.lr == 0.001 and cfg.teacher.revision == "123e4567"
    assert parse_override("generate.k=5") == ("generate.k", 5)
    assert parse_override("prompts.chat_template=true") == ("prompts.chat_template", True)
    with pytest.raises(ConfigError):
        parse_override("train.lr")


def test_yaml_syntax_error_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher:\n  model: x\n prompts: [\n")
    with pytest.raises(ConfigError, match=r"YAML syntax error at line \d"):
        load_config(bad)


def test_generate_fingerprint_ignores_training_settings():
    raw = {"teacher": {"model": "x"}, "prompts": {"path": "p"}, "student": {"model": "s"}}
    base = build_config(raw)
    assert (
        build_config(raw, ["train.lr=0.1", "train.alpha=1", "eval.max_prompts=5"]).generate_fingerprint()
        == base.generate_fingerprint()
    )
    assert build_config(raw, ["generate.k=5"]).generate_fingerprint() != base.generate_fingerprint()
    assert build_config(raw, ["teacher.model=y"]).generate_fingerprint() != base.generate_fingerprint()


def test_operational_teacher_settings_do_not_change_the_dataset_key():
    raw = {"teacher": {"backend": "vllm_server", "model": "x"}, "prompts": {"path": "p"}, "student": {"model": "s"}}
    base = build_config(raw).generate_fingerprint()
    same = build_config(raw, ["teacher.url=http://127.0.0.1:9000", "teacher.concurrency=8", "teacher.max_retries=0"])
    assert same.generate_fingerprint() == base
    assert build_config(raw, ["teacher.dtype=bfloat16"]).generate_fingerprint() != base


def test_extra_server_flags_change_the_dataset_key():
    raw = {"teacher": {"backend": "vllm_server", "model": "x"}, "prompts": {"path": "p"}, "student": {"model": "s"}}
    assert (
        build_config(raw, ["teacher.extra_args=[--quantization, fp8]"]).generate_fingerprint()
        != build_config(raw).generate_fingerprint()
    )
