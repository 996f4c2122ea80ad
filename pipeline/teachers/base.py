"""The Teacher protocol every backend implements, and the record it returns per sampled completion."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class SamplingSpec:
    """What the teacher is asked to do for each prompt."""

    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    k: int
    seed: int


@dataclass
class Generation:
    """One sampled completion with the teacher's raw (T=1) top-k logprobs at every generated token.

    Shapes: L generated tokens (the EOS token included when generation stopped on it), k candidates.
    """

    completion_token_ids: np.ndarray  # int32 [L]
    token_logprobs: np.ndarray  # float32 [L], logprob of the sampled token, even outside the top-k
    topk_token_ids: np.ndarray  # int32 [L, k], sorted by logprob descending
    topk_logprobs: np.ndarray  # float32 [L, k]
    finish_reason: str  # "stop" | "length"


@dataclass(frozen=True)
class TeacherInfo:
    """How the numbers were made; stored in the dataset manifest."""

    model: str
    backend: str
    revision: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    vocab_size: int = 0
    eos_token_ids: tuple[int, ...] = ()


class Teacher(Protocol):
    """A backend that samples completions and reports top-k raw logprobs per generated token."""

    info: TeacherInfo

    def generate(self, prompts: list[list[int]], spec: SamplingSpec, seed: int) -> list[list[Generation]]:
        """For each prompt (token ids), `spec.n` completions; `seed` makes the call reproducible."""
        ...

    def close(self) -> None:
        """Release the model / stop a managed server."""
        ...
