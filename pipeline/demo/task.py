"""The demo task: draw symbols from a prompt in proportion to their counts, then sort them.

Prompt:      ``pick: d a k a m f =``
Completion:  `` a 2 ; m 1 ; a 2 | a a d f k m``

The three draws (with replacement, probability = count / 6) are genuinely uncertain and depend on
the prompt, so a teacher's soft labels there carry information a single sampled token does not;
every count and the sorted list are determined by the prompt. Letters a-p make 16 symbols, so the
tokenizer's vocabulary is large enough that top-20 logprobs are a real cut.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

TASK_VERSION = 1
"""Bump whenever the prompt or completion format changes: cached demo teachers are rebuilt."""

LETTERS = "abcdefghijklmnop"
N_SYMBOLS = 6
N_DRAWS = 3
PREFIX = "pick:"
SUFFIX = "="
DRAW_SEP = " ;"
SORT_SEP = " |"
DRAW_WORDS = tuple(3 * i for i in range(N_DRAWS))
"""Indices of the uncertain (drawn) symbols among the completion's space-separated words."""


def make_prompt(rng: random.Random) -> str:
    """Return one prompt of N_SYMBOLS letters drawn uniformly with replacement."""
    symbols = [rng.choice(LETTERS) for _ in range(N_SYMBOLS)]
    return " ".join([PREFIX, *symbols, SUFFIX])


def prompt_symbols(prompt: str) -> list[str]:
    """Return the prompt's symbols; raise ValueError if the prompt is malformed."""
    words = prompt.split(" ")
    if len(words) != N_SYMBOLS + 2 or words[0] != PREFIX or words[-1] != SUFFIX:
        raise ValueError(f"not a demo prompt: {prompt!r}")
    symbols = words[1:-1]
    if any(len(s) != 1 or s not in LETTERS for s in symbols):
        raise ValueError(f"not a demo prompt: {prompt!r}")
    return symbols


def draw_distribution(prompt: str) -> dict[str, float]:
    """Return the true distribution of every draw: each symbol with probability count / total."""
    counts = Counter(prompt_symbols(prompt))
    return {s: c / N_SYMBOLS for s, c in sorted(counts.items())}


def render(symbols: list[str], draws: list[str]) -> str:
    """Format the canonical completion (with its leading space) for the given draws."""
    counts = Counter(symbols)
    parts = [f" {d} {counts[d]}" for d in draws]
    return DRAW_SEP.join(parts) + SORT_SEP + "".join(f" {s}" for s in sorted(symbols))


def sample_completion(prompt: str, rng: random.Random) -> str:
    """Return a ground-truth completion: N_DRAWS draws in proportion to count, then the sort."""
    symbols = prompt_symbols(prompt)
    return render(symbols, [rng.choice(symbols) for _ in range(N_DRAWS)])


def check(prompt: str, completion: str) -> bool:
    """True iff the completion (surrounding whitespace stripped) is exactly a valid answer."""
    symbols = prompt_symbols(prompt)
    text = " " + completion.strip()
    draws = text.split(SORT_SEP)[0].split(DRAW_SEP)
    draws = [d.split(" ")[1] if d.count(" ") == 2 else "" for d in draws]
    if len(draws) != N_DRAWS or any(d not in symbols for d in draws):
        return False
    return text == render(symbols, draws)


def make_prompts(n: int, seed: int) -> list[str]:
    """Return n prompts, the same for the same seed."""
    rng = random.Random(seed)
    return [make_prompt(rng) for _ in range(n)]


def _write_jsonl(path: Path, rows: Iterator[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def write_prompts_jsonl(path: Path, n: int, seed: int) -> Path:
    """Write n prompts as JSON lines ``{"prompt": ...}`` and return the path."""
    return _write_jsonl(path, ({"prompt": prompt} for prompt in make_prompts(n, seed)))


def write_sft_jsonl(path: Path, n: int, seed: int) -> Path:
    """Write n prompts with a ground-truth completion each, ``{"prompt": ..., "completion": ...}``: text a user
    already has, for `generate.mode: rescore`."""
    rng = random.Random(seed)

    def rows() -> Iterator[dict]:
        for _ in range(n):
            prompt = make_prompt(rng)
            yield {"prompt": prompt, "completion": sample_completion(prompt, rng)}

    return _write_jsonl(path, rows())


def sort_choices(symbols: list[str], rng: random.Random, n: int = 4) -> tuple[list[str], int]:
    """The sorted list and n - 1 near misses (two neighbours swapped, one symbol replaced by another of the prompt's
    or by a letter it lacks), shuffled; returns the choices (each with its leading space) and the answer's index."""
    right = sorted(symbols)
    wrong: set[tuple[str, ...]] = set()
    while len(wrong) < n - 1:
        guess, i = list(right), rng.randrange(len(right))
        kind = rng.randrange(3)
        if kind == 0 and i + 1 < len(guess) and guess[i] != guess[i + 1]:
            guess[i], guess[i + 1] = guess[i + 1], guess[i]
        elif kind == 1 and len(set(symbols)) > 1:
            guess[i] = rng.choice([s for s in symbols if s != guess[i]])
            guess.sort()
        elif kind == 2:
            guess[i] = rng.choice([s for s in LETTERS if s not in symbols])
            guess.sort()
        if guess != right:
            wrong.add(tuple(guess))
    choices = [right, *map(list, sorted(wrong))]
    rng.shuffle(choices)
    return ["".join(f" {s}" for s in c) for c in choices], choices.index(right)


def write_benchmark_jsonl(path: Path, n: int, seed: int) -> Path:
    """Write n multiple-choice rows for the lm-evaluation-harness demo tasks: ``prompt``, ``context`` (the prompt,
    sampled draws and the sort separator), four ``choices`` for the sorted list and the ``label`` of the right one."""
    rng = random.Random(seed)

    def rows() -> Iterator[dict]:
        for _ in range(n):
            prompt = make_prompt(rng)
            draws = sample_completion(prompt, rng).split(SORT_SEP)[0]
            choices, label = sort_choices(prompt_symbols(prompt), rng)
            yield {"prompt": prompt, "context": prompt + draws + SORT_SEP, "choices": choices, "label": label}

    return _write_jsonl(path, rows())


def corpus(n: int, seed: int) -> Iterator[str]:
    """Yield n prompt+completion texts, e.g. to train the tokenizer on."""
    rng = random.Random(seed)
    for _ in range(n):
        prompt = make_prompt(rng)
        yield prompt + sample_completion(prompt, rng)
