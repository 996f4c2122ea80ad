"""The prompts and generate sections: what the teacher is given and how it samples (the generate key)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.base import _Strict


class PromptsConfig(_Strict):
    """Where prompts come from and how they become token ids."""

    path: str
    """A .jsonl file, a .parquet file, or a directory saved by `datasets.save_to_disk`."""
    field: str = "prompt"
    """Column/key holding the prompt: a string, or a list of chat messages."""
    chat_template: bool = False
    """Apply the tokenizer's chat template (instruct teachers)."""
    limit: int | None = Field(None, ge=1)
    """Use only the first N prompts."""
    heldout_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of prompts (split by prompt id) kept out of training and used by eval."""
    max_prompt_tokens: int | None = Field(None, ge=1)
    """Prompts longer than this are invalid (None: no limit)."""
    on_invalid: Literal["skip", "fail"] = "skip"
    """Empty or too-long prompts: `skip` them and count them in the manifest, or `fail` naming the first."""
    completion_field: str = "completion"
    """`generate.mode: rescore`: the column/key holding each prompt's given completion (text, or token ids used
    as they are). Not needed when `field` holds chat messages: their last assistant turn is the completion."""
    append_eos: bool = True
    """`generate.mode: rescore`: end each plain-text completion with the teacher's EOS token, so the student
    learns to stop (chat completions end with the template's own end-of-turn; token-id completions are kept)."""
    completions_by: str | None = None
    """`generate.mode: rescore`: who wrote the completions (recorded in the manifest; on-policy rounds name the
    student checkpoint)."""
    overlong: Literal["skip", "truncate"] = "skip"
    """`generate.mode: rescore`: a prompt + completion longer than the teacher's context is skipped and counted,
    or its completion is cut to fit (counted, finish_reason `given_truncated`)."""


RESCORE_ONLY = ("completion_field", "append_eos", "overlong", "completions_by")
"""`prompts` settings that only `generate.mode: rescore` reads."""


class GenerateConfig(_Strict):
    """Sampling settings of the teacher; together with teacher+prompts they key the dataset cache."""

    mode: Literal["sample", "rescore"] = "sample"
    """`sample`: the teacher writes the completions. `rescore`: the completions come with the prompts
    (`prompts.completion_field` or chat messages) and the teacher is forced through them, scoring every token."""
    k: int = Field(20, ge=1, le=1000)
    """Top-k token ids and logprobs stored per generated token."""
    n: int = Field(1, ge=1)
    """Completions sampled per prompt."""
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(64, ge=1)
    seed: int = 0
    shard_size: int = Field(1024, ge=1)
    """Prompts per Parquet shard; a shard is the unit of resume."""
    logprobs_dtype: Literal["float16", "float32"] = "float32"

    @model_validator(mode="after")
    def _rescore_samples_nothing(self) -> GenerateConfig:
        if self.mode == "rescore" and self.n != 1:
            raise ValueError("generate.n samples completions; rescore scores each given completion once: drop n")
        return self
