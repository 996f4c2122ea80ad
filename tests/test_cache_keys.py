"""The cache keys, pinned field by field: every field of the run config, found by walking the pydantic models (both
teacher backends, nested sections), is changed alone to a valid other value, and each key must change exactly when
the field can change what the key stands for.

- the generate keys (`RunConfig.generate_fingerprint`, `generate_key`, the flow's per-shard task key): the dataset. A
  wrong one either hands back an old dataset for new settings or regenerates for nothing;
- `RunConfig.train_fingerprint`, which guards `--resume`: a checkpoint from other training settings.

A field of a key's sections is expected to change it unless it is listed in that key's NEUTRAL table, with the reason
it cannot change the output. A new field is therefore in a key until someone states why not; a field that changes no
key at all (eval, the run's name) must be listed too. Changed values come from each field's type and constraints
(`changed`); CHANGES overrides the few that need a hand-picked value.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable

import annotated_types as at
import pytest
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from pipeline.config import RunConfig
from pipeline.generate import generate_key

# ---- what each key covers ---------------------------------------------------------------------------------------

SECTIONS = {"generate": ("teacher", "prompts", "generate"), "train": ("student", "train")}
"""The config sections whose fields a key must cover (a field outside them must never change it)."""

NEUTRAL = {
    "generate": {
        "teacher.url": "which server answers: every request carries its own seed",
        "teacher.urls": "which servers answer",
        "teacher.num_servers": "how many managed servers share the shards",
        "teacher.served_model_name": "the name an attached server knows the model by",
        "teacher.api_key_env": "where the API key is read from",
        "teacher.python": "the interpreter that starts a managed server",
        "teacher.gpu_memory_utilization": "KV-cache room: batching only, seeds are per request",
        "teacher.cpu_kvcache_space_gb": "KV-cache room on CPU builds",
        "teacher.startup_timeout_s": "how long to wait for a server",
        "teacher.concurrency": "requests in flight",
        "teacher.request_timeout_s": "how long to wait for a request",
        "teacher.max_retries": "retries of a request with the same seed",
        "teacher.trust_remote_code": "whether loading may run the model's code, not what it computes",
        "teacher.device": "where the in-process teacher runs",
        "prompts.on_invalid": "whether an invalid prompt stops the run; the prompts kept are the same",
    },
    "generate in sample mode": {
        "prompts.completion_field": "only generate.mode: rescore reads the completions",
        "prompts.append_eos": "only generate.mode: rescore reads the completions",
        "prompts.overlong": "only generate.mode: rescore reads the completions",
        "prompts.completions_by": "only generate.mode: rescore records who wrote the completions",
    },
    "train": {
        "train.checkpoint_every": "how often a checkpoint is written",
        "train.keep_checkpoints": "how many checkpoints are kept",
        "train.log_every": "how often the loss is logged",
        "train.device": "where training runs",
        "train.gradient_checkpointing": "memory: the same numbers up to float summation order (test_train_resume)",
        "train.loss_chunk_size": "memory: positions per LM-head chunk, the same sums (test_losses)",
        "train.report_to": "where the logged numbers are also sent (experiment trackers), not what is trained",
    },
    "train without a live teacher": {
        f"train.{family}.{name}": "the live-teacher losses act only with train.live_teacher (off in this base)"
        for family, names in {
            "feature": ("weight", "kind", "layer_map"),
            "attention": ("weight", "layer_map", "relations", "relation_heads"),
            "relation": ("weight", "student_layer", "teacher_layer", "distance", "angle"),
        }.items()
        for name in names
    },
}
"""Per key, the fields of its sections that must NOT change it, each with the reason."""

NO_KEY = {
    "name": "a label",
    "rounds": "later rounds' datasets and students are keyed per round, from the run's keys (pipeline/rounds.py)",
    "on_policy.share": "keyed per round (pipeline/rounds.py)",
    "on_policy.n": "keyed per round",
    "on_policy.temperature": "keyed per round",
    "on_policy.max_new_tokens": "keyed per round",
    "on_policy.steps": "keyed per round",
    "on_policy.repeat": "keyed per round",
    "on_policy.earlier": "keyed per round",
    "on_policy.kind": "keyed per round",
    "on_policy.tail_bucket": "keyed per round",
    "on_policy.alpha": "keyed per round",
    "on_policy.lr": "keyed per round",
    "output_dir": "where the outputs go (the dataset is found there, then checked against the keys)",
    "eval.task": "evaluation is never cached: it runs again every time",
    "eval.max_prompts": "evaluation is never cached",
    "eval.batch_size": "evaluation is never cached",
    "eval.seed": "evaluation is never cached",
    **{
        f"eval.lm_eval.{name}": "evaluation is never cached (the teacher's lm-eval scores have their own key)"
        for name in ("tasks", "include_path", "limit", "num_fewshot", "batch_size", "chat_template", "teacher")
    },
}
"""Fields outside every key's sections: listed here so that a new one is a decision, not an accident."""

CHANGES: dict[str, Callable[[typing.Any], typing.Any]] = {
    "teacher.url": lambda _: "http://10.0.0.5:8000",
    "teacher.urls": lambda urls: [*urls, "http://10.0.0.6:8000"],
    "teacher.extra_args": lambda args: [*args, "--enforce-eager"],
    "teacher.engine_args": lambda args: {**args, "enforce_eager": True},
    "train.feature.layer_map": lambda m: {**(m or {}), 1: 2},
    "train.attention.layer_map": lambda m: {**(m or {}), 0: 0},
    "student.from_teacher.layers": lambda layers: "every_other" if layers != "every_other" else 3,
}
"""Changed values picked by hand where the generic rule (`changed`) would do, but a realistic one reads better."""

BASES = {
    "hf teacher, pretrained student": {
        "teacher": {"backend": "hf", "model": "teacher"},
        "prompts": {"path": "prompts.jsonl"},
        "student": {"model": "student"},
    },
    "vllm teacher, shrunk student": {
        "teacher": {"backend": "vllm_server", "model": "teacher"},
        "prompts": {"path": "prompts.jsonl", "limit": 10},
        "student": {"shrink": {"hidden_size": 64}},
    },
    "vllm engine teacher": {
        "teacher": {"backend": "vllm_engine", "model": "teacher"},
        "prompts": {"path": "prompts.jsonl"},
        "student": {"model": "student"},
    },
    "hf teacher, student cut from the teacher": {
        "teacher": {"backend": "hf", "model": "teacher"},
        "prompts": {"path": "prompts.jsonl"},
        "student": {"from_teacher": {"layers": [0, 2], "hidden_size": 64}},
        "eval": {"lm_eval": {"tasks": ["demo_sort"], "include_path": "tasks", "limit": 8, "num_fewshot": 0}},
    },
    "rescore mode, mixed datasets, rounds": {
        "teacher": {"backend": "vllm_server", "model": "teacher"},
        "prompts": {"path": "prompts.jsonl"},
        "generate": {"mode": "rescore"},
        "student": {"model": "student"},
        "train": {"mix": [{"path": "other/dataset", "repeat": 2}]},
        "rounds": 2,
    },
    "live teacher, every family": {
        "teacher": {"backend": "vllm_engine", "model": "teacher"},
        "prompts": {"path": "prompts.jsonl"},
        "student": {"shrink": {"hidden_size": 64}},
        "train": {
            "live_teacher": True,
            "feature": {"weight": 0.5, "layer_map": {0: 1}},
            "attention": {"weight": 0.5, "relation_heads": 2},
            "relation": {"weight": 0.5},
        },
    },
}
"""Configs that between them set every optional section: each field is varied in every base that has it."""

_NEEDS_LIVE = {f"train.{f}.weight": "a weight needs train.live_teacher" for f in ("feature", "attention", "relation")}
INVALID_IN = {
    "hf teacher, pretrained student": _NEEDS_LIVE,
    "vllm teacher, shrunk student": _NEEDS_LIVE,
    "vllm engine teacher": _NEEDS_LIVE,
    "hf teacher, student cut from the teacher": _NEEDS_LIVE,
    "rescore mode, mixed datasets, rounds": {"generate.n": "rescore scores each given completion once", **_NEEDS_LIVE},
    "live teacher, every family": {"train.live_teacher": "the families weighted here need it"},
}
"""Fields a base cannot vary (the config refuses any other value there); another base varies them."""

# ---- the keys ---------------------------------------------------------------------------------------------------


def shard_key(cfg: RunConfig, index: int = 3, urls: tuple[str, ...] = ()) -> str:
    """The flow's cache key of shard `index`, computed by Prefect's cache policy from the task's inputs as
    `PrefectShards` passes them (the config, `generate_key(cfg)`, the index, the endpoints)."""
    from flows.distill import shard_task

    inputs = inspect.signature(shard_task.fn).bind(cfg, generate_key(cfg), index, list(urls), None).arguments
    return shard_task.cache_policy.compute_key(task_ctx=None, inputs=inputs, flow_parameters={})


KEYS: dict[str, tuple[str, Callable[[RunConfig], str]]] = {
    "generate_fingerprint": ("generate", RunConfig.generate_fingerprint),
    "generate_key": ("generate", generate_key),
    "shard task key": ("generate", shard_key),
    "train_fingerprint": ("train", RunConfig.train_fingerprint),
}
"""Each key: the NEUTRAL/SECTIONS entry it is held to, and how it is computed."""

# ---- walking the models -----------------------------------------------------------------------------------------


def _models_in(annotation) -> list[type[BaseModel]]:
    return [a for a in typing.get_args(annotation) or (annotation,) if isinstance(a, type) and issubclass(a, BaseModel)]


def schema_fields(model: type[BaseModel] = RunConfig) -> set[tuple[str, str]]:
    """(model class, field) for every leaf field reachable from `model`'s types: every union member, every section."""
    out = set()
    for name, field in model.model_fields.items():
        subs = _models_in(field.annotation)
        out |= set().union(*(schema_fields(sub) for sub in subs)) if subs else {(model.__name__, name)}
    return out


def _bounds(field: FieldInfo) -> Callable[[float], bool]:
    checks = []
    for m in field.metadata:
        for attr, ok in (("ge", float.__ge__), ("gt", float.__gt__), ("le", float.__le__), ("lt", float.__lt__)):
            if isinstance(m, getattr(at, attr.capitalize())):
                checks.append(lambda v, ok=ok, bound=float(getattr(m, attr)): ok(float(v), bound))
    return lambda v: all(c(v) for c in checks)


def _first_allowed(field: FieldInfo, candidates: list) -> typing.Any:
    allowed = _bounds(field)
    return next(c for c in candidates if allowed(c))


def _some(tp, field: FieldInfo) -> typing.Any:
    """A valid value of type `tp` (setting an optional field that is None)."""
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)[0]
    if tp is bool:
        return True
    if tp is int:
        return _first_allowed(field, [1, *range(2, 1025)])
    if tp is float:
        return _first_allowed(field, [0.5, 1.0, 2.0, 0.25])
    if tp is str:
        return "set"
    if typing.get_origin(tp) is list:
        return [_some(typing.get_args(tp)[0], FieldInfo())]
    raise NotImplementedError(f"no generic value of {tp}")


def changed(value, field: FieldInfo) -> typing.Any:
    """Another valid value for a field, from its type and constraints."""
    ann = field.annotation
    if value is None:
        inner = [a for a in typing.get_args(ann) if a is not type(None)]
        return _some(inner[0], field)
    if typing.get_origin(ann) is typing.Literal:
        choices = typing.get_args(ann)
        if len(choices) < 2:
            raise NotImplementedError("a single-choice Literal (a union's discriminator) has no other value")
        return choices[(choices.index(value) + 1) % len(choices)]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return _first_allowed(field, [value + 1, value - 1])
    if isinstance(value, float):
        return _first_allowed(field, [value + 0.25, value - 0.25, value / 2, value * 2])
    if isinstance(value, str):
        return value + "-changed"
    if isinstance(value, list):
        return [*value, _some(typing.get_args(ann)[0], FieldInfo())]
    raise NotImplementedError(f"no generic change for a {type(value).__name__}")


def variations(cfg: RunConfig, invalid: dict | None = None) -> list[tuple[str, tuple[str, str], RunConfig]]:
    """(dotted path, (model class, field), cfg with that one field changed) for every leaf field set in `cfg`."""
    raw = cfg.model_dump()
    out = []

    def walk(model: BaseModel, path: tuple) -> None:
        for name, field in type(model).model_fields.items():
            value, dotted = getattr(model, name), ".".join(map(str, (*path, name)))
            if isinstance(value, BaseModel):
                walk(value, (*path, name))
                continue
            if isinstance(value, list) and value and isinstance(value[0], BaseModel):
                for i, item in enumerate(value):  # a list of sections (train.mix): each item's fields
                    walk(item, (*path, name, i))
                continue
            if dotted in (invalid or {}):
                continue
            if _models_in(field.annotation):
                continue  # a section left unset here (student.shrink): the other base sets it
            if name == "backend":
                continue  # the union's discriminator: test_each_teacher_backend_is_a_key_of_its_own
            try:
                new = CHANGES[dotted](value) if dotted in CHANGES else changed(value, field)
            except (NotImplementedError, StopIteration) as err:
                raise AssertionError(f"{dotted}: {err}; add an entry to CHANGES") from None
            tree = node = {**raw}
            for key in path:
                node[key] = list(node[key]) if isinstance(node[key], list) else {**node[key]}
                node = node[key]
            node[name] = new
            try:
                out.append((dotted, (type(model).__name__, name), RunConfig.model_validate(tree)))
            except ValidationError as err:
                if value is None:
                    continue  # exclusive with a field set here (student.model): the other base sets it
                raise AssertionError(f"{dotted}={new!r} is not valid ({err}); add an entry to CHANGES") from None

    walk(cfg, ())
    return out


@pytest.fixture
def bases(tmp_path, monkeypatch) -> dict[str, RunConfig]:
    """BASES with a real prompts file and teacher directory (generate_key hashes their contents)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a"}\n')
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.json").write_text("{}")
    return {name: RunConfig.model_validate(raw) for name, raw in BASES.items()}


LIVE_TEACHER_IDENTITY = ("teacher.model", "teacher.revision")
"""With a live teacher, the teacher the train stage loads is in the train key (what it computes shapes training)."""


def expected_change(dotted: str, key: str, cfg: RunConfig) -> bool:
    covers = KEYS[key][0]
    if covers == "generate" and cfg.generate.mode == "sample" and dotted in NEUTRAL["generate in sample mode"]:
        return False
    if covers == "train" and not cfg.train.live_teacher and dotted in NEUTRAL["train without a live teacher"]:
        return False
    if covers == "train" and cfg.train.live_teacher and dotted in LIVE_TEACHER_IDENTITY:
        return True
    return dotted.split(".")[0] in SECTIONS[covers] and dotted not in NEUTRAL[covers]


# ---- the tests --------------------------------------------------------------------------------------------------


def test_every_config_field_is_varied(bases):
    """The walk reaches every field of every model (both backends, the shrink section): none escapes the key test."""
    seen = {owner for name, cfg in bases.items() for _, owner, _ in variations(cfg, INVALID_IN.get(name))}
    seen |= {(m, "backend") for m in ("HFTeacherConfig", "VLLMServerTeacherConfig", "VLLMEngineTeacherConfig")}
    missed = schema_fields() - seen
    assert missed == set(), f"fields no base config can vary (set them in a BASES entry, or add to CHANGES): {missed}"
    assert len(seen) > 60  # the walk is not empty: 70 fields when this test was written


def test_the_neutral_tables_name_real_fields():
    """A renamed or removed field must leave the tables too (else the table lists nothing and pins nothing)."""
    dotted = {f"teacher.{name}" for b in ("hf", "vllm_server", "vllm_engine") for name in _teacher_fields(b)}
    for section in ("prompts", "generate", "student", "train", "eval", "on_policy"):
        for sub in _models_in(RunConfig.model_fields[section].annotation):
            dotted |= {f"{section}.{name}" for name in sub.model_fields}
            for name, field in sub.model_fields.items():  # sections inside sections (train.feature)
                for inner in _models_in(field.annotation):
                    dotted |= {f"{section}.{name}.{leaf}" for leaf in inner.model_fields}
    dotted |= set(RunConfig.model_fields)
    listed = set(NO_KEY) | set(CHANGES) | set().union(*NEUTRAL.values())
    assert listed - dotted == set()


def _teacher_fields(backend: str) -> dict:
    return {m.model_fields["backend"].default: m for m in _models_in(RunConfig.model_fields["teacher"].annotation)}[
        backend
    ].model_fields


@pytest.mark.parametrize("key", list(KEYS))
def test_key_changes_exactly_for_the_fields_that_change_the_output(bases, key):
    compute = KEYS[key][1]
    wrong = []
    for base_name, base in bases.items():
        before = compute(base)
        for dotted, _, cfg in variations(base, INVALID_IN.get(base_name)):
            moved = compute(cfg) != before
            if moved == expected_change(dotted, key, base):
                continue
            if moved:
                wrong.append(f"{dotted} ({base_name}) changes {key}, but it is listed as not changing the output")
            elif dotted.split(".")[0] in SECTIONS[KEYS[key][0]] or dotted in LIVE_TEACHER_IDENTITY:
                wrong.append(
                    f"{dotted} ({base_name}) does not change {key}: add it to the key, or to NEUTRAL[{KEYS[key][0]!r}] "
                    "with the reason it cannot change the output"
                )
            else:
                wrong.append(f"{dotted} ({base_name}) changes {key}, though {key} does not cover its section")
    assert wrong == []


def test_every_field_changes_some_key_or_is_listed(bases):
    """A field that changes no key is a decision to write down (NEUTRAL or NO_KEY), never a silent default."""
    silent = []
    for name, base in bases.items():
        befores = {key: compute(base) for key, (_, compute) in KEYS.items()}
        for dotted, _, cfg in variations(base, INVALID_IN.get(name)):
            if any(compute(cfg) != befores[key] for key, (_, compute) in KEYS.items()):
                continue
            if dotted not in NO_KEY and not any(dotted in n for n in NEUTRAL.values()):
                silent.append(dotted)
    assert silent == [], f"fields that change no cache key and are not listed in NEUTRAL or NO_KEY: {silent}"


ROUND_SAMPLING = {"on_policy.share", "on_policy.n", "on_policy.temperature", "on_policy.max_new_tokens"}
"""on_policy fields that make a round's dataset (keyed by its generate fingerprint), not its training."""


def test_a_rounds_train_key_follows_every_on_policy_training_field(bases):
    """A finished round's student is kept while `round.json` holds its train key (pipeline/rounds.py): every
    on_policy field that changes the round's training (its lr included) must change that key; the sampling ones
    change the round's dataset instead."""
    from pipeline.rounds import round_train_config

    base = bases["rescore mode, mixed datasets, rounds"]
    before = round_train_config(base, 2).train_fingerprint()
    moved = {
        dotted: round_train_config(cfg, 2).train_fingerprint() != before
        for dotted, _, cfg in variations(base, INVALID_IN.get("rescore mode, mixed datasets, rounds"))
        if dotted.startswith("on_policy.")
    }
    assert len(moved) == 11 and "on_policy.lr" in moved
    assert {d for d, m in moved.items() if not m} == ROUND_SAMPLING


def test_a_rounds_lr_defaults_to_where_round_0_ended(bases):
    """Without on_policy.lr a round peaks at round 0's last lr (10% of train.lr), so it follows train.lr."""
    from pipeline.rounds import round_train_config

    base = bases["rescore mode, mixed datasets, rounds"]
    assert round_train_config(base, 1).train.lr == pytest.approx(0.1 * base.train.lr)
    faster = RunConfig.model_validate({**base.model_dump(), "train": {**base.train.model_dump(), "lr": 1e-2}})
    assert round_train_config(faster, 1).train.lr == pytest.approx(1e-3)
    assert round_train_config(faster, 1).train_fingerprint() != round_train_config(base, 1).train_fingerprint()
    own = RunConfig.model_validate({**base.model_dump(), "on_policy": {"lr": 5e-4}})
    assert round_train_config(own, 1).train.lr == 5e-4


def test_each_teacher_backend_is_a_key_of_its_own(bases):
    """The same model through the other backend is another teacher (hf samples differently from vLLM)."""
    hf = bases["hf teacher, pretrained student"]
    vllm = RunConfig.model_validate({**hf.model_dump(), "teacher": {"backend": "vllm_server", "model": "teacher"}})
    engine = RunConfig.model_validate({**hf.model_dump(), "teacher": {"backend": "vllm_engine", "model": "teacher"}})
    for key in ("generate_fingerprint", "generate_key", "shard task key"):
        assert len({KEYS[key][1](hf), KEYS[key][1](vllm), KEYS[key][1](engine)}) == 3, key
    assert hf.train_fingerprint() == vllm.train_fingerprint() == engine.train_fingerprint()


def test_the_student_source_is_part_of_the_train_key(bases):
    cfg = bases["hf teacher, pretrained student"]
    shrunk = RunConfig.model_validate({**cfg.model_dump(), "student": {"shrink": {"hidden_size": 64}}})
    assert shrunk.train_fingerprint() != cfg.train_fingerprint()
    assert shrunk.generate_fingerprint() == cfg.generate_fingerprint()
    cut = RunConfig.model_validate({**cfg.model_dump(), "student": {"from_teacher": {"layers": "every_other"}}})
    assert len({cut.train_fingerprint(), shrunk.train_fingerprint(), cfg.train_fingerprint()}) == 3
    assert cut.generate_fingerprint() == cfg.generate_fingerprint()


def test_the_train_key_of_a_student_not_cut_from_the_teacher_is_as_before(bases):
    """`student.from_teacher` enters the key only when set: checkpoints written before it existed still resume."""
    import hashlib
    import json

    cfg = bases["vllm teacher, shrunk student"]
    operational = {"checkpoint_every", "keep_checkpoints", "log_every", "device", "gradient_checkpointing",
                   "loss_chunk_size", "report_to", "live_teacher", "feature", "attention", "relation"}  # fmt: skip
    before = {"student": {k: v for k, v in cfg.student.model_dump().items() if k != "from_teacher"}}
    before["train"] = cfg.train.model_dump(exclude=operational)
    assert cfg.train_fingerprint() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]


def test_generate_keys_follow_the_contents_of_the_prompts_file_and_the_teacher(bases, tmp_path):
    """A prompts file edited in place, or a teacher retrained at the same path, is new input: a new dataset."""
    cfg = bases["hf teacher, pretrained student"]
    before = (cfg.generate_fingerprint(), generate_key(cfg), shard_key(cfg))
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "b"}\n')
    after_prompts = (cfg.generate_fingerprint(), generate_key(cfg), shard_key(cfg))
    (tmp_path / "teacher" / "model.safetensors").write_bytes(b"weights")
    after_teacher = (cfg.generate_fingerprint(), generate_key(cfg), shard_key(cfg))
    assert before[0] == after_prompts[0] == after_teacher[0]  # the config's own hash does not read files
    assert len({before[1], after_prompts[1], after_teacher[1]}) == 3
    assert len({before[2], after_prompts[2], after_teacher[2]}) == 3


def test_shard_key_is_the_generate_key_and_the_index_not_the_endpoints(bases):
    cfg = bases["vllm teacher, shrunk student"]
    assert shard_key(cfg, 3) == f"distill-shard-{generate_key(cfg)}-3"
    assert shard_key(cfg, 3) != shard_key(cfg, 4) and shard_key(cfg, 1) != shard_key(cfg, 11)
    assert shard_key(cfg, 3, ("http://a:1",)) == shard_key(cfg, 3, ("http://b:2", "http://c:3")) == shard_key(cfg, 3)


def test_config_hash_follows_every_field(bases):
    """The manifest's `config_hash` records the whole config: any one field changed is another hash."""
    for name, base in bases.items():
        assert RunConfig.model_validate(base.model_dump()).config_hash() == base.config_hash()
        varied = variations(base, INVALID_IN.get(name))
        same = [dotted for dotted, _, cfg in varied if cfg.config_hash() == base.config_hash()]
        assert same == []


GOLDEN = {
    "hf teacher, pretrained student": ("98c232b8283c7cbb", "dc0eb822f2958c8f"),
    "vllm teacher, shrunk student": ("420dcd5b8fec7af4", "5a935cbc63da1343"),
    "vllm engine teacher": ("69229dbb74de517e", "dc0eb822f2958c8f"),
    "hf teacher, student cut from the teacher": ("98c232b8283c7cbb", "8506b2705fa39ff6"),
    "rescore mode, mixed datasets, rounds": ("bfa98fe58d5d5019", "818de3598bab057e"),
    "live teacher, every family": ("69229dbb74de517e", "073e195eb6f9d245"),
}
"""(generate_fingerprint, train_fingerprint) of each base, as computed on 2026-12-02."""


@pytest.mark.parametrize("name", sorted(BASES))
def test_keys_of_existing_configs_do_not_move(name):
    """A key that changes for an unchanged config makes every user's dataset regenerate (or checkpoint refuse to
    resume) after an upgrade. If a change is meant to do that (a new field that changes the output), update GOLDEN
    and say so in the release note; a new field that does not change the output must be left out of the key."""
    cfg = RunConfig.model_validate(BASES[name])
    assert (cfg.generate_fingerprint(), cfg.train_fingerprint()) == GOLDEN[name]
