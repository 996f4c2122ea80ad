"""Reading a transformers decoder's inner states during its forward: the output of chosen decoder layers and the
query/key/value projections of chosen attention blocks, through forward hooks (no model code is changed).

Hooking the projections, not the attention probabilities, means any attention implementation works (sdpa, flash,
eager): the relation losses are computed from the projected vectors themselves (before rotary embeddings).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from pipeline.core import UserError


class UnsupportedArchitectureError(UserError):
    """A model whose layers or attention projections this module cannot find."""


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a transformers causal LM (Llama/Qwen/Mistral/Gemma/Phi-3 `layers`, GPT-2 `h`)."""
    trunk = getattr(model, model.base_model_prefix, model)
    n = getattr(model.config, "num_hidden_layers", None)
    for name in ("layers", "h", "blocks", "layer"):
        found = getattr(trunk, name, None)
        if isinstance(found, torch.nn.ModuleList) and (n is None or len(found) == n):
            return found
    raise UnsupportedArchitectureError(
        f"cannot find the decoder layers of {type(model).__name__}: live-teacher losses support models whose "
        "trunk keeps its blocks in `layers` or `h` (Llama, Qwen, Mistral, Gemma, Phi-3, GPT-2 families)"
    )


def _head_sizes(config) -> tuple[int, int, int]:
    """(query width, key width, value width) of one attention block, from the model config."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads * head_dim, kv * head_dim, kv * head_dim


def qkv_modules(model: torch.nn.Module, layer: int) -> tuple[list[torch.nn.Module], list[int] | None]:
    """The projection module(s) whose outputs are layer `layer`'s queries, keys and values: three separate ones
    (`q_proj`, `k_proj`, `v_proj`), or one fused with the split sizes (Phi-3 `qkv_proj`, GPT-2 `c_attn`)."""
    block = decoder_layers(model)[layer]
    attn = getattr(block, "self_attn", None) or getattr(block, "attn", None)
    if attn is not None and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")):
        return [attn.q_proj, attn.k_proj, attn.v_proj], None
    if attn is not None and hasattr(attn, "qkv_proj"):
        return [attn.qkv_proj], list(_head_sizes(model.config))
    if attn is not None and hasattr(attn, "c_attn"):
        width = model.config.hidden_size
        return [attn.c_attn], [width, width, width]
    raise UnsupportedArchitectureError(
        f"cannot find the query/key/value projections of {type(model).__name__} layer {layer}: the attention loss "
        "supports q_proj/k_proj/v_proj, qkv_proj (Phi-3) and c_attn (GPT-2) blocks"
    )


def qkv_widths(model: torch.nn.Module) -> tuple[int, int, int]:
    """Widths of one layer's queries, keys and values (what relation heads must divide)."""
    modules, split = qkv_modules(model, 0)
    if split is not None:
        return tuple(split)
    return tuple(m.out_features for m in modules)


def _tensor(output) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


class Recorder:
    """Within `with Recorder(model, hidden=[...], qkv=[...]) as rec:`, each forward fills `rec.hidden[layer]`
    ([B, T, d], that decoder layer's output) and `rec.qkv[layer]` ((q, k, v), each [B, T, width])."""

    def __init__(self, model: torch.nn.Module, *, hidden: Iterable[int] = (), qkv: Iterable[int] = ()):
        self.model = model
        self.hidden_layers, self.qkv_layers = sorted(set(hidden)), sorted(set(qkv))
        self.hidden: dict[int, Tensor] = {}
        self.qkv: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self._handles: list = []
        self._parts: dict[int, list[Tensor | None]] = {}

    def __enter__(self) -> Recorder:
        layers = decoder_layers(self.model) if self.hidden_layers else None
        for i in self.hidden_layers:
            self._handles.append(layers[i].register_forward_hook(self._keep_hidden(i)))
        for i in self.qkv_layers:
            modules, split = qkv_modules(self.model, i)
            self._parts[i] = [None] * len(modules)
            for slot, module in enumerate(modules):
                self._handles.append(module.register_forward_hook(self._keep_projection(i, slot, split)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _keep_hidden(self, layer: int):
        def hook(module, args, output):
            self.hidden[layer] = _tensor(output)

        return hook

    def _keep_projection(self, layer: int, slot: int, split: list[int] | None):
        def hook(module, args, output):
            out = _tensor(output)
            if split is not None:
                self.qkv[layer] = tuple(out.split(split, dim=-1))
                return
            parts = self._parts[layer]
            parts[slot] = out
            if all(p is not None for p in parts):
                self.qkv[layer] = tuple(parts)
                self._parts[layer] = [None] * len(parts)

        return hook
