"""The eval section: held-out metrics, the task checker and lm-evaluation-harness tasks."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.config.base import _Strict


class LMEvalConfig(_Strict):
    """lm-evaluation-harness tasks scored on the student and the teacher, side by side in metrics.json."""

    tasks: list[str] = Field(min_length=1)
    """Task or group names: the harness's own (hub datasets) or ones defined in `include_path`."""
    include_path: str | None = None
    """A folder of task YAMLs (e.g. `data/lm_eval`, the demo's tasks over a shipped JSONL)."""
    limit: int | None = Field(None, ge=1)
    """Documents per task (None: all)."""
    num_fewshot: int | None = Field(None, ge=0)
    batch_size: int = Field(16, ge=1)
    chat_template: bool = False
    """Render each request through the tokenizer's chat template (instruct models)."""
    teacher: bool = True
    """Score the teacher too (once per teacher and task settings: cached under output_dir/lm_eval)."""


class EvalConfig(_Strict):
    """Held-out evaluation of teacher vs student."""

    task: Literal["demo", "none"] = "none"
    """`demo` scores completions with the demo task's exact checker; `none` skips accuracy."""
    max_prompts: int = Field(2000, ge=1)
    batch_size: int = Field(256, ge=1)
    seed: int = 0
    lm_eval: LMEvalConfig | None = None
    """Standard benchmarks through lm-evaluation-harness (the `lmeval` extra); None skips them."""
