"""The student section: a checkpoint, a shrunk copy of the teacher config, or layers taken from the teacher."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import _Strict


class ShrinkConfig(_Strict):
    """Student built from the teacher's config with these fields replaced (randomly initialised)."""

    hidden_size: int | None = Field(None, ge=8)
    intermediate_size: int | None = Field(None, ge=8)
    num_hidden_layers: int | None = Field(None, ge=1)
    num_attention_heads: int | None = Field(None, ge=1)
    num_key_value_heads: int | None = Field(None, ge=1)
    head_dim: int | None = Field(None, ge=8)


class FromTeacherConfig(_Strict):
    """Student cut from the teacher: a subset of its decoder layers, optionally narrower, the kept weights copied
    (pipeline/prune.py; narrowing keeps the channels, heads and neurons with the largest weight norm)."""

    layers: list[int] | int | Literal["every_other"] | None = None
    """Teacher layers kept: a list of indices in increasing order, `every_other` (0, 2, 4, ...), or a count (spread
    evenly, the first and the last kept). Default: all."""
    hidden_size: int | None = Field(None, ge=8)
    """Narrower residual stream (default: the teacher's)."""
    intermediate_size: int | None = Field(None, ge=1)
    """Fewer MLP neurons per layer."""
    num_attention_heads: int | None = Field(None, ge=1)
    """Fewer query heads per layer (whole heads: head_dim stays the teacher's)."""
    num_key_value_heads: int | None = Field(None, ge=1)
    """Fewer key/value heads (default: the teacher's query heads per key/value head are kept)."""

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, value: Any) -> Any:
        if value is None or value == "every_other":
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise ValueError("keep at least 1 layer")
            return value
        if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            raise ValueError("give a list of layer indices, `every_other` or a layer count")
        if not value or value[0] < 0 or any(b <= a for a, b in zip(value, value[1:], strict=False)):
            raise ValueError("list teacher layers (>= 0) in increasing order without repeats, e.g. [0, 2, 4]")
        return value

    @model_validator(mode="after")
    def _whole_groups(self) -> FromTeacherConfig:
        heads, kv = self.num_attention_heads, self.num_key_value_heads
        if heads is not None and kv is not None and heads % kv:
            raise ValueError(
                f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv}): heads come in groups"
            )
        return self


class StudentConfig(_Strict):
    """Where the student starts: a pretrained path/id, a shrunk copy of the teacher's config, or the teacher cut."""

    model: str | None = None
    """Pretrained student (path or hub id). Exactly one of `model`, `shrink`, `from_teacher`."""
    shrink: ShrinkConfig | None = None
    from_teacher: FromTeacherConfig | None = None
    revision: str | None = None
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> StudentConfig:
        if sum(x is not None for x in (self.model, self.shrink, self.from_teacher)) != 1:
            raise ValueError(
                "set exactly one of student.model (pretrained), student.shrink (from teacher config) or "
                "student.from_teacher (the teacher's layers, copied)"
            )
        return self

    def identity(self) -> dict:
        """The fields that make the student (`from_teacher` only when set: keys of earlier runs stay as they were)."""
        return self.model_dump(exclude=set() if self.from_teacher else {"from_teacher"})
