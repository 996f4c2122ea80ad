"""The Teacher protocol every backend implements; a backend returns `Generation` records of the dataset contract."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from pipeline.core import UserError, stable_id
from pipeline.dataset.schema import Generation


@dataclass(frozen=True)
class SamplingSpec:
    """What the teacher is asked to do for each prompt."""

    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    k: int
    seed: int


@dataclass(frozen=True)
class TeacherInfo:
    """How the numbers were made; stored in the dataset manifest."""

    model: str
    backend: str
    revision: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    vocab_size: int = 0
    tokenizer_size: int = 0  # len(tokenizer); embedding rows beyond it are padding with no text (0: unknown)
    eos_token_ids: tuple[int, ...] = ()


class Teacher(Protocol):
    """A backend that samples completions, or scores given ones, reporting top-k raw logprobs per completion token."""

    info: TeacherInfo

    def generate(self, prompts: list[list[int]], spec: SamplingSpec, seed: int) -> list[list[Generation]]:
        """For each prompt (token ids), `spec.n` completions; `seed` makes the call reproducible."""
        ...

    def score(self, prompts: list[list[int]], completions: list[list[int]], k: int) -> list[Generation]:
        """The teacher forced through each given completion (`generate.mode: rescore`): per completion token, the
        top-k raw logprobs and the given token's logprob, in one prefill pass; finish_reason `given`."""
        ...

    def close(self) -> None:
        """Release the model / stop a managed server."""
        ...


def request_seeds(seed: int, count: int) -> list[int]:
    """One seed per prompt of a call seeded `seed`: vLLM backends send each prompt with its own seed, so results
    do not depend on concurrency or batching. vLLM seeds sample j of a request with seed + j, so the seeds are
    hashed, far apart."""
    return [int(stable_id("request", seed, i)[:15], 16) for i in range(count)]


class TeacherServerError(UserError):
    """The teacher server could not start, died, or kept failing; one line with where to look."""


class TeacherRequestError(UserError):
    """The server refused a request (HTTP 4xx): a setting is wrong, retrying will not help."""
