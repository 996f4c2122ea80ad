"""What the live-teacher losses compare: layer pairs, relation heads and the learned projections, resolved once
against the two loaded models and checked, so a bad layer map is one line before training, not an index error."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config import ConfigError, TrainConfig
from pipeline.live.capture import decoder_layers, qkv_widths

VECTOR_TYPES = ("query", "key", "value")


@dataclass(frozen=True)
class LivePlan:
    """Resolved, non-negative layer indices for each active family; empty tuples / None where a family is off."""

    feature_pairs: tuple[tuple[int, int], ...]
    attention_pairs: tuple[tuple[int, int], ...]
    relation_pair: tuple[int, int] | None
    relation_heads: int
    vector_types: tuple[int, ...]  # indices into (query, key, value)
    student_width: int
    teacher_width: int
    feature_kind: str = "mse"
    relation_distance: float = 1.0
    relation_angle: float = 2.0

    def student_hidden(self) -> list[int]:
        return [s for s, _ in self.feature_pairs] + ([self.relation_pair[0]] if self.relation_pair else [])

    def teacher_hidden(self) -> list[int]:
        return [t for _, t in self.feature_pairs] + ([self.relation_pair[1]] if self.relation_pair else [])

    def student_qkv(self) -> list[int]:
        return [s for s, _ in self.attention_pairs]

    def teacher_qkv(self) -> list[int]:
        return [t for _, t in self.attention_pairs]


def _layer(index: int, n: int, what: str, setting: str) -> int:
    """`index` (negative from the end) as 0..n-1, or a one-line ConfigError naming the setting."""
    if not -n <= index < n:
        raise ConfigError(
            f"{setting} names {what} layer {index}, but the {what} has {n} decoder layers (0..{n - 1}, or -1..-{n})"
        )
    return index % n


def uniform_map(n_student: int, n_teacher: int) -> dict[int, int]:
    """Every student layer to the teacher layer at the same relative depth, the last to the last."""
    return {i: round((i + 1) * n_teacher / n_student) - 1 for i in range(n_student)}


def _pairs(layer_map: dict[int, int], n_s: int, n_t: int, setting: str) -> tuple[tuple[int, int], ...]:
    return tuple(
        sorted({(_layer(s, n_s, "student", setting), _layer(t, n_t, "teacher", setting)) for s, t in layer_map.items()})
    )


def _widths(model: torch.nn.Module, types: tuple[int, ...]) -> list[int]:
    widths = qkv_widths(model)
    return [widths[i] for i in types]


def make_plan(t: TrainConfig, student: torch.nn.Module, teacher: torch.nn.Module) -> LivePlan:
    """Resolve and check the live-teacher settings against the loaded student and teacher."""
    n_s, n_t = len(decoder_layers(student)), len(decoder_layers(teacher))
    feature = ()
    if t.feature.weight > 0:
        feature = _pairs(t.feature.layer_map or uniform_map(n_s, n_t), n_s, n_t, "train.feature.layer_map")
    attention, heads, types = (), 0, ()
    if t.attention.weight > 0:
        attention = _pairs(t.attention.layer_map or {-1: -1}, n_s, n_t, "train.attention.layer_map")
        types = tuple(sorted({VECTOR_TYPES.index(r) for r in t.attention.relations}))
        widths = _widths(student, types) + _widths(teacher, types)
        heads = t.attention.relation_heads or next(
            r for r in range(student.config.num_attention_heads, 0, -1) if all(w % r == 0 for w in widths)
        )
        if any(w % heads for w in widths):
            raise ConfigError(
                f"train.attention.relation_heads={heads} does not divide the query/key/value widths "
                f"(student {_widths(student, types)}, teacher {_widths(teacher, types)}); pick a common divisor"
            )
    relation = None
    if t.relation.weight > 0:
        relation = (
            _layer(t.relation.student_layer, n_s, "student", "train.relation.student_layer"),
            _layer(t.relation.teacher_layer, n_t, "teacher", "train.relation.teacher_layer"),
        )
    return LivePlan(
        feature_pairs=feature,
        attention_pairs=attention,
        relation_pair=relation,
        relation_heads=heads,
        vector_types=types,
        student_width=student.config.hidden_size,
        teacher_width=teacher.config.hidden_size,
        feature_kind=t.feature.kind,
        relation_distance=t.relation.distance,
        relation_angle=t.relation.angle,
    )


class Projections(torch.nn.Module):
    """Learned linear maps from the student's hidden width to the teacher's, one per feature layer pair (FitNets
    regressors); none where the widths are equal. They train with the student and live in checkpoints, never in
    the saved student directory."""

    def __init__(self, plan: LivePlan):
        super().__init__()
        self.maps = torch.nn.ModuleDict()
        if plan.student_width != plan.teacher_width:
            for s, t in plan.feature_pairs:
                self.maps[f"{s}_{t}"] = torch.nn.Linear(plan.student_width, plan.teacher_width, bias=False)

    def forward(self, hidden: torch.Tensor, pair: tuple[int, int]) -> torch.Tensor:
        key = f"{pair[0]}_{pair[1]}"
        return self.maps[key](hidden) if key in self.maps else hidden
