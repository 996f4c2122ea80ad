"""Config validation at the edge: every shipped config loads; bad keys/types fail in one line."""

import re
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


# ---- what a config that sets nothing gets, what it may set, and how a mistake reads ------------------------------

VLLM = {"teacher": {"backend": "vllm_server", "model": "x"}, "prompts": {"path": "p"}, "student": {"model": "s"}}
HF = {"teacher": {"model": "x"}, "prompts": {"path": "p"}, "student": {"model": "s"}}

DEFAULTS = {
    "teacher": {"backend": "hf", "revision": None, "dtype": "float32", "device": "auto", "batch_size": 64},
    "prompts": {"field": "prompt", "chat_template": False, "limit": None, "heldout_fraction": 0.0},
    "generate": {"k": 20, "n": 1, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 64, "seed": 0},
    "train": {"alpha": 0.0, "temperature": 1.0, "kind": "forward_kl", "beta": 0.5, "tail_bucket": False},
    "eval": {"task": "none", "max_prompts": 2000, "batch_size": 256, "seed": 0},
}
DEFAULTS["prompts"] |= {"max_prompt_tokens": None, "on_invalid": "skip"}
DEFAULTS["generate"] |= {"shard_size": 1024, "logprobs_dtype": "float32"}
DEFAULTS["train"] |= {"max_steps": 500, "batch_size": 32, "grad_accum": 1, "lr": 3e-3, "weight_decay": 0.0}
DEFAULTS["train"] |= {
    "warmup_steps": 20,
    "max_grad_norm": 1.0,
    "loss_chunk_size": 1024,
    "gradient_checkpointing": False,
}
DEFAULTS["train"] |= {"checkpoint_every": 500, "keep_checkpoints": 2, "seed": 0, "device": "auto", "log_every": 25}
VLLM_DEFAULTS = {"url": None, "urls": [], "num_servers": 1, "served_model_name": None, "api_key_env": None}
VLLM_DEFAULTS |= {"python": ".venv-teacher/bin/python", "dtype": "auto", "max_model_len": None}
VLLM_DEFAULTS |= {"tensor_parallel_size": 1, "gpu_memory_utilization": 0.9, "cpu_kvcache_space_gb": None}
VLLM_DEFAULTS |= {"startup_timeout_s": 600, "concurrency": 64, "request_timeout_s": 600, "max_retries": 5}
VLLM_DEFAULTS |= {"extra_args": [], "trust_remote_code": False}


def test_defaults_are_the_documented_ones():
    """What a run that sets nothing gets (README, docs/design.md, the field docstrings)."""
    dump = build_config(HF).model_dump()
    for section, values in DEFAULTS.items():
        assert {name: dump[section][name] for name in values} == values, section
    assert (dump["name"], dump["output_dir"]) == ("run", "data/runs/run")
    vllm = build_config(VLLM).model_dump()["teacher"]
    assert {name: vllm[name] for name in VLLM_DEFAULTS} == VLLM_DEFAULTS


# dotted key -> (values accepted at the edges, values just past them that are refused)
BOUNDS = {
    "teacher.batch_size": ([1], [0]),
    "teacher.num_servers": ([1], [0]),
    "teacher.max_model_len": ([16], [15]),
    "teacher.tensor_parallel_size": ([1], [0]),
    "teacher.gpu_memory_utilization": ([1e-6, 1.0], [0.0, 1.000001]),
    "teacher.cpu_kvcache_space_gb": ([1], [0]),
    "teacher.startup_timeout_s": ([1e-6], [0.0]),
    "teacher.concurrency": ([1], [0]),
    "teacher.request_timeout_s": ([1e-6], [0.0]),
    "teacher.max_retries": ([0], [-1]),
    "prompts.limit": ([1], [0]),
    "prompts.heldout_fraction": ([0.0, 0.999], [-1e-6, 1.0]),
    "prompts.max_prompt_tokens": ([1], [0]),
    "generate.k": ([1, 1000], [0, 1001]),
    "generate.n": ([1], [0]),
    "generate.temperature": ([0.0], [-1e-6]),
    "generate.top_p": ([1e-6, 1.0], [0.0, 1.000001]),
    "generate.max_new_tokens": ([1], [0]),
    "generate.shard_size": ([1], [0]),
    "student.shrink.hidden_size": ([8], [7]),
    "student.shrink.intermediate_size": ([8], [7]),
    "student.shrink.num_hidden_layers": ([1], [0]),
    "student.shrink.num_attention_heads": ([1], [0]),
    "student.shrink.num_key_value_heads": ([1], [0]),
    "student.shrink.head_dim": ([8], [7]),
    "student.from_teacher.hidden_size": ([8], [7]),
    "student.from_teacher.intermediate_size": ([1], [0]),
    "student.from_teacher.num_attention_heads": ([1], [0]),
    "student.from_teacher.num_key_value_heads": ([1], [0]),
    "train.alpha": ([0.0, 1.0], [-1e-6, 1.000001]),
    "train.temperature": ([1e-6], [0.0]),
    "train.beta": ([0.0, 1.0], [-1e-6, 1.000001]),
    "train.max_steps": ([1], [0]),
    "train.batch_size": ([1], [0]),
    "train.grad_accum": ([1], [0]),
    "train.lr": ([1e-9], [0.0]),
    "train.weight_decay": ([0.0], [-1e-6]),
    "train.warmup_steps": ([0], [-1]),
    "train.max_grad_norm": ([1e-6], [0.0]),
    "train.loss_chunk_size": ([1], [0]),
    "train.checkpoint_every": ([0], [-1]),
    "train.keep_checkpoints": ([1], [0]),
    "train.log_every": ([1], [0]),
    "eval.max_prompts": ([1], [0]),
    "eval.batch_size": ([1], [0]),
}


@pytest.mark.parametrize("key", list(BOUNDS))
def test_each_bound_accepts_its_edge_and_refuses_past_it(key):
    raw = VLLM if key.startswith("teacher.") and key != "teacher.batch_size" else HF
    if key.startswith("student.shrink."):
        raw = {**raw, "student": {"shrink": {}}}
    if key.startswith("student.from_teacher."):
        raw = {**raw, "student": {"from_teacher": {}}}
    ok, refused = BOUNDS[key]
    for value in ok:
        build_config(raw, [f"{key}={value}"])
    for value in refused:
        with pytest.raises(ConfigError, match=f"config key '{key}'"):
            build_config(raw, [f"{key}={value}"])


def test_errors_inside_a_backend_or_a_validator_read_as_one_plain_line():
    with pytest.raises(ConfigError) as err:
        build_config(VLLM, ["teacher.concurrency=0"])
    assert str(err.value) == "config key 'teacher.concurrency': Input should be greater than or equal to 1"
    with pytest.raises(ConfigError) as err:
        build_config({**HF, "student": {}})
    assert str(err.value) == (
        "config key 'student': set exactly one of student.model (pretrained), student.shrink (from teacher config) "
        "or student.from_teacher (the teacher's layers, copied)"
    )
    with pytest.raises(
        ConfigError, match=r"^unknown config key 'teacher.concurency' \(did you mean 'teacher.concurrency'"
    ):
        build_config(VLLM, ["teacher.concurency=3"])
    with pytest.raises(ConfigError, match=r"\(did you mean 'student.shrink.hidden_size'\?\)$"):
        build_config({**HF, "student": {"shrink": {"hiden_size": 64}}})
    with pytest.raises(ConfigError, match=r"^unknown config key 'zzzz'$"):  # nothing close: no suggestion
        build_config({**HF, "zzzz": 1})


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["teacher.url=http://a:1", "teacher.urls=[http://b:2]"], "set teacher.url (one server) or teacher.urls"),
        (["teacher.num_servers=2", "teacher.url=http://a:1"], "teacher.num_servers starts managed servers"),
        (["teacher.num_servers=2", "teacher.urls=[http://a:1]"], "teacher.num_servers starts managed servers"),
        (["teacher.urls=[http://a:1, http://a:1]"], "teacher.urls lists the same server twice"),
    ],
)
def test_ways_to_reach_servers_exclude_each_other(overrides, message):
    with pytest.raises(ConfigError, match="^" + re.escape(f"config key 'teacher': {message}")):
        build_config(VLLM, overrides)


def test_endpoints_and_output_paths():
    assert build_config(VLLM).teacher.endpoints() == []
    assert build_config(VLLM, ["teacher.url=http://a:1/"]).teacher.endpoints() == ["http://a:1"]
    assert build_config(VLLM, ["teacher.url=http://hostX/"]).teacher.endpoints() == ["http://hostX"]  # only '/' goes
    assert build_config(VLLM, ["teacher.urls=[http://a:1/, http://b:2]"]).teacher.endpoints() == [
        "http://a:1",
        "http://b:2",
    ]
    assert build_config(VLLM, ["teacher.num_servers=3"]).teacher.endpoints() == []
    cfg = build_config({**HF, "output_dir": "out/x"})
    assert (cfg.dataset_dir, cfg.student_dir, cfg.metrics_path) == (
        Path("out/x/dataset"),
        Path("out/x/student"),
        Path("out/x/metrics.json"),
    )


def test_override_syntax():
    assert parse_override("prompts.field= text=a ") == ("prompts.field", "text=a")  # the first '=' splits
    assert parse_override("teacher.revision=") == ("teacher.revision", "")
    assert build_config(HF, ["name=b=c"]).name == "b=c"
    with pytest.raises(ConfigError, match="override 'train.lr' must look like key.path=value"):
        parse_override("train.lr")
    with pytest.raises(ConfigError, match="cannot set 'train.lr.x': 'lr' is not a section"):
        build_config({**HF, "train": {"lr": 0.1}}, ["train.lr.x=1"])


def test_config_files_that_cannot_be_read_say_why(tmp_path):
    with pytest.raises(ConfigError, match=f"config file '{tmp_path / 'none.yaml'}' not found"):
        load_config(tmp_path / "none.yaml")
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="the top level must be a mapping of config sections"):
        load_config(listed)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="missing required config key 'teacher'"):
        load_config(empty)
    good = tmp_path / "good.yaml"
    good.write_text("teacher: {model: x}\nprompts: {path: p}\nstudent: {model: s}\n")
    assert load_config(good, ["generate.k=3"]).generate.k == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: {model: x\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: YAML syntax error at line 2: "):
        load_config(bad)


def test_yaml_errors_are_one_line_with_the_line_and_the_problem(tmp_path):
    """A parser error names its line and problem; a reader error (a control character) has no mark, and its own
    text runs over two lines: the line comes from its character position instead."""
    unclosed = tmp_path / "unclosed.yaml"
    unclosed.write_text("name: run\nteacher: [1, 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(unclosed)
    assert str(err.value) == f"{unclosed}: YAML syntax error at line 3: expected ',' or ']', but got '<stream end>'"
    control = tmp_path / "control.yaml"
    control.write_text("\nname: run\noutput_dir: a\x07b\nrounds: 1\n\n\n\n")  # counted from the first line
    with pytest.raises(ConfigError) as err:
        load_config(control)
    assert str(err.value) == (
        f"{control}: YAML syntax error at line 3: unacceptable character #x0007: special characters are not allowed"
    )


def test_an_error_of_the_whole_config_has_no_key_to_name():
    with pytest.raises(ConfigError) as err:
        build_config([])  # type: ignore[arg-type]
    assert str(err.value) == "config: Input should be a valid dictionary or instance of RunConfig"
