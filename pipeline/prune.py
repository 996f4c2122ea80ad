"""A student cut from the teacher (`student.from_teacher`): a subset of its decoder layers, optionally narrower, with
the kept weights copied, as DistilBERT (every other layer) and Minitron / Sheared-LLaMA (width pruning) initialise.

Narrowing keeps, by the sum of squared weights that read or write them (no data needed; Minitron ranks by activation
magnitude instead, which needs a calibration pass): the residual channels (one set for the whole model), and per kept
layer the whole key/value groups, the query heads inside each kept group, and the MLP neurons. Heads stay whole
(head_dim is the teacher's), so RoPE and the grouped-query structure are unchanged. Narrowing is for Llama-style
models (Llama, Qwen2, Mistral, Gemma 2: `model.layers.N` with separate q/k/v/o and gate/up/down projections);
keeping layers also works for Phi-3 (fused projections) and GPT-2 (`transformer.h.N`).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import torch

from pipeline.config import ConfigError, FromTeacherConfig

LAYER_KEY = re.compile(r"^(model\.layers|transformer\.h)\.(\d+)\.(.+)$")
"""A decoder layer's parameter: Llama-style `model.layers.N.*` or GPT-2 `transformer.h.N.*`."""

FUSED = ("phi3",)
"""Model types whose attention and MLP projections are fused (`qkv_proj`, `gate_up_proj`): layers only."""

NARROWED = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
"""The config fields `from_teacher` may make smaller."""


@dataclass(frozen=True)
class Plan:
    """What to cut, checked against the teacher's config before any weight is loaded."""

    layers: list[int]
    """The teacher layer each student layer is copied from."""
    sizes: dict[str, int] = field(default_factory=dict)
    """The student's narrowed sizes (all four of NARROWED when narrowing; empty when only layers are kept)."""
    head_dim: int | None = None


def kept_layers(spec: list[int] | int | str | None, n: int) -> list[int]:
    """Teacher layer indices from `from_teacher.layers`: all, every other (0, 2, ...), a list, or a count spread
    evenly with the first and the last kept (one layer: the first)."""
    if spec is None:
        return list(range(n))
    if spec == "every_other":
        return list(range(0, n, 2))
    if isinstance(spec, int):
        if spec > n:
            raise ConfigError(
                f"student.from_teacher.layers={spec} keeps more layers than the teacher has ({n}); use at most {n}"
            )
        return [0] if spec == 1 else [int(i * (n - 1) / (spec - 1) + 0.5) for i in range(spec)]
    if spec[-1] >= n:
        raise ConfigError(
            f"student.from_teacher.layers lists layer {spec[-1]}, but the teacher has layers 0..{n - 1}; drop it"
        )
    return list(spec)


def _dims(config) -> dict[str, int]:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
    }


def plan(spec: FromTeacherConfig, teacher_config) -> Plan:
    """The layers and sizes to cut from a teacher with `teacher_config`, or a one-line ConfigError."""
    if getattr(teacher_config, "text_config", None) is not None:
        raise ConfigError(
            f"student.from_teacher cuts text-only causal LMs; {teacher_config.model_type} nests a text model: use "
            "student.shrink or a pretrained student.model"
        )
    config = teacher_config
    layers = kept_layers(spec.layers, config.num_hidden_layers)
    asked = {k: v for k, v in spec.model_dump(include=set(NARROWED)).items() if v is not None}
    if not asked:
        return Plan(layers)
    if config.model_type in FUSED:
        raise ConfigError(
            f"student.from_teacher cannot narrow a {config.model_type} teacher: its q/k/v and gate/up projections are "
            "fused into one matrix each; keep layers only (drop the sizes), or use student.shrink"
        )
    if not all(isinstance(getattr(config, k, None), int) for k in ("hidden_size", "intermediate_size")):
        raise ConfigError(
            "student.from_teacher can narrow Llama-style models only (Llama, Qwen2, Mistral, Gemma 2); a "
            f"{config.model_type} teacher can only keep layers: drop the sizes"
        )
    teacher = _dims(config)
    for key, value in asked.items():
        if value > teacher[key]:
            raise ConfigError(
                f"student.from_teacher.{key}={value} is wider than the teacher's {teacher[key]}; narrowing only cuts"
            )
    heads = asked.get("num_attention_heads", teacher["num_attention_heads"])
    group = teacher["num_attention_heads"] // teacher["num_key_value_heads"]
    kv = asked.get("num_key_value_heads")
    if kv is None:  # keep the teacher's query heads per key/value head
        if heads % group:
            raise ConfigError(
                f"student.from_teacher.num_attention_heads={heads} is not a multiple of the teacher's {group} query "
                "heads per key/value head; set num_key_value_heads too"
            )
        kv = heads // group
    if heads % kv or heads // kv > group:
        raise ConfigError(
            f"student.from_teacher: {heads} query heads over {kv} key/value heads cannot be cut from the teacher's "
            f"groups of {group}; use a num_key_value_heads that divides num_attention_heads with at most {group} "
            "heads per group"
        )
    sizes = {**{k: teacher[k] for k in NARROWED}, **asked, "num_attention_heads": heads, "num_key_value_heads": kv}
    return Plan(layers, sizes, teacher["head_dim"])


def student_config(p: Plan, teacher_config):
    """The teacher's config with the kept layer count, the narrowed sizes and the teacher's head_dim."""
    config = copy.deepcopy(teacher_config)
    config.num_hidden_layers = len(p.layers)
    types = getattr(config, "layer_types", None)
    if isinstance(types, list):  # per-layer attention kinds (e.g. Qwen2's sliding window) follow their layers
        config.layer_types = [types[i] for i in p.layers]
    for key, value in p.sizes.items():
        setattr(config, key, value)
    if p.sizes:
        config.head_dim = p.head_dim  # whole heads: the student's head_dim is the teacher's
    return config


def _ssq(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of squares over every dimension but `dim`."""
    t = t.float()
    return t.pow(2).sum(dim=[d for d in range(t.dim()) if d != dim % t.dim()])


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in their original order (ties: the lower index)."""
    order = torch.sort(score, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def _rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def select(p: Plan, sd: dict[str, torch.Tensor]) -> dict:
    """The kept indices: `hidden` (residual channels) and per kept teacher layer its `q`/`kv` rows and `mlp`
    neurons, each ranked by the sum of squared weights that read or write it (norm gains folded into readers)."""
    d = p.head_dim
    embed = sd["model.embed_tokens.weight"]
    hidden = _ssq(embed, 1)
    head_w = sd.get("lm_head.weight")
    if head_w is not None and head_w.data_ptr() != embed.data_ptr():  # untied: the LM head reads the stream too
        hidden = hidden + _ssq(head_w * sd["model.norm.weight"], 1)
    per_layer = {}
    for i in p.layers:
        w = {name: sd[f"model.layers.{i}.{name}.weight"] for name in LLAMA_MATRICES}
        attn_gain = sd[f"model.layers.{i}.input_layernorm.weight"]
        mlp_gain = sd[f"model.layers.{i}.post_attention_layernorm.weight"]
        hidden = hidden + sum(_ssq(w[f"self_attn.{n}_proj"] * attn_gain, 1) for n in "qkv")
        hidden = hidden + _ssq(w["mlp.gate_proj"] * mlp_gain, 1) + _ssq(w["mlp.up_proj"] * mlp_gain, 1)
        hidden = hidden + _ssq(w["self_attn.o_proj"], 0) + _ssq(w["mlp.down_proj"], 0)
        n_heads, n_kv = w["self_attn.q_proj"].shape[0] // d, w["self_attn.k_proj"].shape[0] // d
        group = n_heads // n_kv
        head = _ssq(w["self_attn.q_proj"].reshape(n_heads, d, -1), 0)
        head = head + _ssq(w["self_attn.o_proj"].reshape(-1, n_heads, d), 1)
        kv_score = head.reshape(n_kv, group).sum(1)
        for n in ("k", "v"):
            kv_score = kv_score + _ssq(w[f"self_attn.{n}_proj"].reshape(n_kv, d, -1), 0)
        kv = _top(kv_score, p.sizes["num_key_value_heads"])
        keep = p.sizes["num_attention_heads"] // p.sizes["num_key_value_heads"]
        q = torch.cat([g * group + _top(head[g * group : (g + 1) * group], keep) for g in kv.tolist()])
        mlp = _ssq(w["mlp.gate_proj"], 0) + _ssq(w["mlp.up_proj"], 0) + _ssq(w["mlp.down_proj"], 1)
        per_layer[i] = {"q": _rows(q, d), "kv": _rows(kv, d), "mlp": _top(mlp, p.sizes["intermediate_size"])}
    return {"hidden": _top(hidden, p.sizes["hidden_size"]), "layers": per_layer}


LLAMA_MATRICES = tuple(f"self_attn.{n}_proj" for n in "qkvo") + tuple(f"mlp.{n}_proj" for n in ("gate", "up", "down"))
"""A Llama-style decoder layer's matrices, as `select` ranks them."""

SLICES = {
    "q_proj": ("q", "hidden"),
    "k_proj": ("kv", "hidden"),
    "v_proj": ("kv", "hidden"),
    "o_proj": ("hidden", "q"),
    "gate_proj": ("mlp", "hidden"),
    "up_proj": ("mlp", "hidden"),
    "down_proj": ("hidden", "mlp"),
    "embed_tokens": (None, "hidden"),
    "lm_head": (None, "hidden"),
}
"""Per module, which kept indices each dimension of its weight takes (a bias: the first)."""


def _kinds(module: str) -> tuple:
    if module in SLICES:
        return SLICES[module]
    if module == "norm" or module.endswith("layernorm"):
        return ("hidden",)
    return ()  # copied whole, e.g. Qwen3's per-head q_norm / k_norm (head_dim is kept)


def _cut(t: torch.Tensor, kinds: tuple, index: dict[str, torch.Tensor]) -> torch.Tensor:
    for dim, kind in enumerate(kinds[: t.dim()]):
        if kind is not None:
            t = t.index_select(dim, index[kind])
    return t


def cut(teacher: torch.nn.Module, p: Plan) -> torch.nn.Module:
    """The student: the teacher's config cut by `p`, its weights copied from the teacher's kept layers (student
    layer i from teacher layer p.layers[i]) and sliced to the kept channels, heads and neurons; float32."""
    from transformers import AutoModelForCausalLM

    sd = teacher.state_dict()
    found = {int(m[2]) for k in sd if (m := LAYER_KEY.match(k))}
    if len(found) != teacher.config.num_hidden_layers:
        raise ConfigError(
            f"student.from_teacher needs decoder layers named model.layers.N (Llama-style) or transformer.h.N "
            f"(GPT-2); {type(teacher).__name__} names them otherwise: use student.shrink"
        )
    index = select(p, sd) if p.sizes else None
    student = AutoModelForCausalLM.from_config(student_config(p, teacher.config), dtype=torch.float32)
    with torch.no_grad():
        for key, param in student.state_dict().items():
            m = LAYER_KEY.match(key)
            source = f"{m[1]}.{p.layers[int(m[2])]}.{m[3]}" if m else key
            t = sd.get(source)
            if t is None:
                raise ConfigError(f"student.from_teacher: the teacher has no {source} for the student's {key}")
            if index is not None:
                cuts = {"hidden": index["hidden"], **(index["layers"][p.layers[int(m[2])]] if m else {})}
                t = _cut(t, _kinds(key.rsplit(".", 2)[-2]), cuts)
            if t.shape != param.shape:
                raise ConfigError(
                    f"student.from_teacher cannot narrow {source} {tuple(sd[source].shape)} to {tuple(param.shape)} "
                    f"({type(teacher).__name__} is not Llama-style there); keep the teacher's sizes"
                )
            param.copy_(t.to(param.dtype))
    return student
