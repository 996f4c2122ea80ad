"""Load prompts (JSONL, Parquet, or a `datasets` directory), give them stable ids, tokenize them; in rescore mode,
with the completions that come with them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from pipeline.config import PromptsConfig
from pipeline.core import UserError, stable_id


class PromptsError(UserError):
    """A problem with the prompts source, stated in one line."""


@dataclass(frozen=True)
class GivenCompletion:
    """A completion that comes with its prompt (`generate.mode: rescore`), as the token ids the teacher scores."""

    token_ids: list[int]
    truncated: bool = False
    """Cut to fit the teacher's context (`prompts.overlong: truncate`)."""


@dataclass
class PromptSet:
    """Prompts as the teacher sees them: text (after any chat template), token ids and stable ids."""

    texts: list[str]
    token_ids: list[list[int]]
    ids: list[str]
    fingerprint: str
    skipped: dict[str, int] = field(default_factory=dict)
    completions: list[list[GivenCompletion]] | None = None
    """`generate.mode: rescore`: each prompt's given completions (None when the teacher samples them)."""
    truncated: int = 0
    """Given completions cut to fit the teacher's context."""
    chat: bool = False
    """The completions were the last assistant turns of chat messages."""
    items: list[Any] = field(default_factory=list)
    """Each prompt as the source gave it (a chat without its scored last turn), to write it out again."""

    def __len__(self) -> int:
        return len(self.texts)


def _read_jsonl(path: Path, keys: tuple[str, ...]) -> list[tuple]:
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
        if isinstance(obj, str) and len(keys) == 1:
            out.append((obj,))
        elif isinstance(obj, dict) and keys[0] in obj:
            out.append(tuple(obj.get(key) for key in keys))
        else:
            raise PromptsError(f"{path}:{lineno}: expected a JSON string or an object with key {keys[0]!r}")
    return out


def _columns(path: Path, names: list[str], keys: tuple[str, ...]) -> list[str]:
    """The columns to read: the prompt column must exist, the completion column may be absent."""
    if keys[0] not in names:
        raise PromptsError(f"{path}: no column {keys[0]!r} (columns: {', '.join(names)}); set prompts.field")
    return [k for k in keys if k in names]


def read_rows(cfg: PromptsConfig, keys: tuple[str, ...]) -> list[tuple]:
    """Rows of `keys` (the prompt's first; a later key missing from a row reads as None) in file order."""
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
        present = _columns(path, ds.column_names, keys)
        cols = {k: list(ds[k]) for k in present}
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        present = _columns(path, table.column_names, keys)
        cols = {k: table.column(k).to_pylist() for k in present}
    else:
        cols = None
        rows = _read_jsonl(path, keys)
    if cols is not None:
        length = len(cols[keys[0]])
        rows = list(zip(*(cols.get(k, [None] * length) for k in keys), strict=True))
    if not rows:
        raise PromptsError(f"{path}: no prompts found; the prompts file is empty")
    return rows[: cfg.limit] if cfg.limit else rows


def read_prompts(cfg: PromptsConfig) -> list[Any]:
    """Raw prompts (strings or chat message lists) from the configured source, in file order."""
    return [row[0] for row in read_rows(cfg, (cfg.field,))]


def render(item: Any, tokenizer, chat_template: bool) -> str:
    """The exact prompt text the teacher sees (chat template applied when asked)."""
    if chat_template:
        messages = [{"role": "user", "content": item}] if isinstance(item, str) else item
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as err:  # e.g. a system turn for a template that has no system role
            raise PromptsError(f"the tokenizer's chat template rejects it: {err}; change the messages") from None
    if not isinstance(item, str):
        raise PromptsError("a prompt is a list of chat messages but prompts.chat_template is false; set it to true")
    return item


def encode(text: str, tokenizer, chat_template: bool) -> list[int]:
    # A rendered chat template already holds the BOS token; adding specials again would double it.
    return tokenizer(text, add_special_tokens=not chat_template)["input_ids"]


def split_chat(messages: list[dict], tokenizer) -> tuple[str, str]:
    """A conversation ending with an assistant turn -> (prompt text, completion text), both rendered by the chat
    template: the prompt is everything before the last turn plus the generation prompt, the completion is what the
    template renders after it (the answer and the template's own end-of-turn)."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise PromptsError(
            "the chat template renders the conversation without its generation prompt as a prefix, so the last "
            "assistant turn cannot be cut off; give prompt/completion columns instead"
        )
    return prompt, full[len(prompt) :]


def _completion_ids(value: Any, text_ids, tokenizer, append_eos: bool) -> list[int]:
    if isinstance(value, str):
        ids = text_ids(value)
        return ids + [tokenizer.eos_token_id] if ids and append_eos and tokenizer.eos_token_id is not None else ids
    if isinstance(value, list | tuple) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        if any(not 0 <= t < len(tokenizer) for t in value):
            raise PromptsError(
                f"a completion's token ids fall outside the teacher tokenizer's {len(tokenizer)} tokens; were they "
                "made with another tokenizer?"
            )
        return list(value)
    raise PromptsError(
        f"a completion is a {type(value).__name__}; give text or a list of token ids in prompts.completion_field"
    )


def load_prompt_set(
    cfg: PromptsConfig, tokenizer, *, rescore: bool = False, max_tokens: int | None = None, new_tokens: int = 0
) -> PromptSet:
    """Read, render and tokenize prompts; empty and over-long prompts are skipped and counted, or stop the
    run when `on_invalid: fail`.

    `rescore`: each row also gives its completion (`cfg.completion_field`, or the last assistant turn of a chat),
    tokenized apart from its prompt, so the ids are what the tokenizer makes of each part (text that would merge
    across the boundary is not merged). Rows of one prompt are grouped under it, in file order. `max_tokens` is
    the teacher's limit on prompt + completion (`overlong` decides what happens above it); when the teacher samples,
    a prompt with fewer than `new_tokens` (`generate.max_new_tokens`) positions left below it is over-long.
    """
    texts, token_ids, ids, completions, items = [], [], [], [], []
    skipped = {"empty": 0, "too_long": 0}
    truncated, chat = 0, False
    index: dict[str, int] = {}
    seen_pairs: set[tuple[str, tuple[int, ...]]] = set()

    def invalid(reason: str, number: int, detail: str) -> None:
        if cfg.on_invalid == "fail":
            raise PromptsError(f"{cfg.path}: prompt {number} is {detail}; fix it or set prompts.on_invalid: skip")
        skipped[reason] = skipped.get(reason, 0) + 1

    text_ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    keys = (cfg.field, cfg.completion_field) if rescore else (cfg.field,)
    for number, (item, *given) in enumerate(read_rows(cfg, keys), start=1):
        completion = None
        if rescore:
            value = given[0]
            try:
                if value is None and isinstance(item, list) and item and isinstance(item[-1], dict):
                    if not cfg.chat_template:
                        raise PromptsError("a prompt is a list of chat messages but prompts.chat_template is false")
                    if item[-1].get("role") != "assistant":
                        raise PromptsError("its chat messages do not end with an assistant turn to score")
                    text, answer = split_chat(item, tokenizer)
                    item, chat = item[:-1], True
                    completion = text_ids(answer) if answer.strip() else []
                elif value is None:
                    raise PromptsError(
                        f"it has no {cfg.completion_field!r} (generate.mode: rescore scores given completions: set "
                        "prompts.completion_field, or give chat messages that end with the assistant's turn)"
                    )
                else:
                    text = render(item, tokenizer, cfg.chat_template)
                    completion = _completion_ids(value, text_ids, tokenizer, cfg.append_eos)
            except PromptsError as err:
                raise PromptsError(f"{cfg.path}: row {number}: {str(err).removeprefix('a prompt ')}") from None
        else:
            text = render(item, tokenizer, cfg.chat_template)
        if not text.strip():
            invalid("empty", number, "empty")
            continue
        ids_ = encode(text, tokenizer, cfg.chat_template)
        if cfg.max_prompt_tokens and len(ids_) > cfg.max_prompt_tokens:
            invalid("too_long", number, f"{len(ids_)} tokens, over prompts.max_prompt_tokens={cfg.max_prompt_tokens}")
            continue
        if completion is None and max_tokens is not None and len(ids_) + new_tokens > max_tokens:
            invalid(
                "too_long",
                number,
                f"{len(ids_)} tokens, and with generate.max_new_tokens={new_tokens} over the teacher's context of "
                f"{max_tokens}",
            )
            continue
        pid = stable_id(text)
        if completion is not None:
            if not completion:
                invalid("empty_completion", number, "given an empty completion")
                continue
            cut = False
            if max_tokens is not None and len(ids_) + len(completion) > max_tokens:
                if cfg.overlong == "skip" or len(ids_) >= max_tokens:
                    invalid(
                        "too_long",
                        number,
                        f"{len(ids_) + len(completion)} tokens with its completion, over the "
                        f"teacher's limit of {max_tokens}",
                    )
                    continue
                completion, cut = completion[: max_tokens - len(ids_)], True
            if (pid, tuple(completion)) in seen_pairs:  # the same sample twice would train on it twice
                skipped["duplicate"] = skipped.get("duplicate", 0) + 1
                continue
            seen_pairs.add((pid, tuple(completion)))
            truncated += cut
            if pid in index:
                completions[index[pid]].append(GivenCompletion(completion, cut))
                continue
        elif pid in index:  # the same prompt twice would give duplicate sample ids
            skipped["duplicate"] = skipped.get("duplicate", 0) + 1
            continue
        index[pid] = len(texts)
        items.append(item)
        texts.append(text)
        token_ids.append(ids_)
        ids.append(pid)
        completions.append([GivenCompletion(completion, cut)] if completion is not None else [])
    if not texts:
        raise PromptsError(f"{cfg.path}: every prompt was skipped ({skipped}); nothing to generate")
    identity = ids if not rescore else [f"{p}:{[c.token_ids for c in cs]}" for p, cs in zip(ids, completions)]
    fingerprint = hashlib.sha256("\n".join(identity).encode()).hexdigest()[:16]
    return PromptSet(
        texts,
        token_ids,
        ids,
        fingerprint,
        {k: v for k, v in skipped.items() if v},
        completions if rescore else None,
        truncated,
        chat,
        items,
    )
