"""From YAML and `key.path=value` overrides to a validated RunConfig, or one line saying what is wrong."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config.base import ConfigError
from pipeline.config.run import RunConfig


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted!r}: {key!r} is not a section")
    node[leaf] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`train.lr=1e-3` -> ("train.lr", 0.001); the value is parsed as YAML so types come out right."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of `model` (the "did you mean" candidates). Pydantic strips `Annotated` from a field's
    annotation, so the arguments of a union, list or optional name its models."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        for sub in getattr(ann, "__args__", (ann,)):
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                keys.extend(_all_keys(sub, prefix + name + "."))
    return keys


def _explain(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"] if str(p) not in ("hf", "vllm_server", "vllm_engine"))
    if e["type"] == "extra_forbidden":
        close = difflib.get_close_matches(loc, _all_keys(RunConfig), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown config key {loc!r}{hint}"
    if e["type"] == "missing":
        return f"missing required config key {loc!r}"
    msg = e["msg"].removeprefix("Value error, ")
    return f"config key {loc!r}: {msg}" if loc else f"config: {msg}"


def build_config(raw: dict, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Validate a raw dict (+ dotted overrides) into a RunConfig, or raise ConfigError in one line."""
    tree = json.loads(json.dumps(raw))
    for item in overrides:
        _set_dotted(tree, *parse_override(item))
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_explain(err)) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config file, apply `key.path=value` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: YAML syntax error{_yaml_where(err, text)}: {_yaml_problem(err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config sections")
    return build_config(raw, overrides)


def _yaml_where(err: yaml.YAMLError, text: str) -> str:
    """` at line N` for a parser error (its mark) or a reader error (a character position); '' if neither."""
    mark = getattr(err, "problem_mark", None)
    if mark is not None:
        return f" at line {mark.line + 1}"
    position = getattr(err, "position", None)  # yaml.reader.ReaderError: a bad character
    if not isinstance(position, int):
        return ""
    line = text.count("\n", 0, position) + 1
    return f" at line {line}"


def _yaml_problem(err: yaml.YAMLError) -> str:
    """The error's problem in one line (a reader error's text runs over two lines: what, then where)."""
    return getattr(err, "problem", None) or str(err).splitlines()[0]
