"""Load prompts (JSONL, Parquet, or a `datasets` directory), give them stable ids, tokenize them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import PromptsConfig
from pipeline.core import UserError, stable_id


class PromptsError(UserError):
    """A problem with the prompts source, stated in one line."""


@dataclass
class PromptSet:
    """Prompts as the teacher sees them: text (after any chat template), token ids and stable ids."""

    texts: list[str]
    token_ids: list[list[int]]
    ids: list[str]
    fingerprint: str
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)


def _read_jsonl(path: Path, key: str) -> list[Any]:
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise PromptsError(f"{path}: not UTF-8 text (byte {err.start}); save the prompts file as UTF-8") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptsError(f"{path}:{lineno}: malformed JSON ({err.msg}); fix or remove that line") from None
        if isinstance(obj, str):
            out.append(obj)
        elif isinstance(obj, dict) and key in obj:
            out.append(obj[key])
        else:
            raise PromptsError(f"{path}:{lineno}: expected a JSON string or an object with key {key!r}")
    return out


def read_prompts(cfg: PromptsConfig) -> list[Any]:
    """Raw prompts (strings or chat message lists) from the configured source, in file order."""
    path = Path(cfg.path)
    if not path.exists():
        raise PromptsError(
            f"prompts source {cfg.path!r} not found; set prompts.path to a .jsonl, .parquet or datasets directory"
        )
    if path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[next(iter(ds))]
        if cfg.field not in ds.column_names:
            raise PromptsError(
                f"{path}: no column {cfg.field!r} (columns: {', '.join(ds.column_names)}); set prompts.field"
            )
        items = list(ds[cfg.field])
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if cfg.field not in table.column_names:
            raise PromptsError(
                f"{path}: no column {cfg.field!r} (columns: {', '.join(table.column_names)}); set prompts.field"
            )
        items = table.column(cfg.field).to_pylist()
    else:
        items = _read_jsonl(path, cfg.field)
    if not items:
        raise PromptsError(f"{path}: no prompts found; the prompts file is empty")
    return items[: cfg.limit] if cfg.limit else items


def render(item: Any, tokenizer, chat_template: bool) -> str:
    """The exact prompt text the teacher sees (chat template applied when asked)."""
    if chat_template:
        messages = [{"role": "user", "content": item}] if isinstance(item, str) else item
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(item, str):
        raise PromptsError("a prompt is a list of chat messages but prompts.chat_template is false; set it to true")
    return item


def encode(text: str, tokenizer, chat_template: bool) -> list[int]:
    # A rendered chat template already holds the BOS token; adding specials again would double it.
    return tokenizer(text, add_special_tokens=not chat_template)["input_ids"]


def load_prompt_set(cfg: PromptsConfig, tokenizer) -> PromptSet:
    """Read, render and tokenize prompts; empty and over-long prompts are skipped and counted, or stop the
    run when `on_invalid: fail`."""
    texts, token_ids, ids = [], [], []
    skipped = {"empty": 0, "too_long": 0}
    seen: set[str] = set()

    def invalid(reason: str, number: int, detail: str) -> None:
        if cfg.on_invalid == "fail":
            raise PromptsError(f"{cfg.path}: prompt {number} is {detail}; fix it or set prompts.on_invalid: skip")
        skipped[reason] += 1

    for number, item in enumerate(read_prompts(cfg), start=1):
        text = render(item, tokenizer, cfg.chat_template)
        if not text.strip():
            invalid("empty", number, "empty")
            continue
        ids_ = encode(text, tokenizer, cfg.chat_template)
        if cfg.max_prompt_tokens and len(ids_) > cfg.max_prompt_tokens:
            invalid("too_long", number, f"{len(ids_)} tokens, over prompts.max_prompt_tokens={cfg.max_prompt_tokens}")
            continue
        pid = stable_id(text)
        if pid in seen:  # the same prompt twice would give duplicate sample ids
            skipped["duplicate"] = skipped.get("duplicate", 0) + 1
            continue
        seen.add(pid)
        texts.append(text)
        token_ids.append(ids_)
        ids.append(pid)
    if not texts:
        raise PromptsError(f"{cfg.path}: every prompt was skipped ({skipped}); nothing to generate")
    fingerprint = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]
    return PromptSet(texts, token_ids, ids, fingerprint, {k: v for k, v in skipped.items() if v})
