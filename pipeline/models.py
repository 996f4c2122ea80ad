"""Loading models and tokenizers with the real `from_pretrained` (path or hub id), and their fingerprints."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pipeline import prune
from pipeline.config import RunConfig, StudentConfig
from pipeline.core import UserError, looks_local


class ModelLoadError(UserError):
    """A model or tokenizer that cannot be loaded, stated in one line."""


class TokenizerMismatchError(UserError):
    """Student and teacher tokenizers differ: top-k ids would point at the wrong tokens."""


class VocabularyError(UserError):
    """A student whose embedding cannot represent every token of the tokenizer."""


def output_vocab_size(model) -> int:
    """How many token ids the model scores: its LM head's rows (out_features), padding rows included."""
    return int(model.get_output_embeddings().weight.shape[0])


def output_head(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """The LM head plus what the model's forward does to its output (Gemma 2/3's final-logit soft cap, Cohere's
    logit scale, Granite's logit divisor), so head(trunk hidden states) equals `model(...).logits` wherever the
    losses, the metrics and the transformers teacher run the head on gathered positions."""
    head = model.get_output_embeddings()
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    if config is None:
        return head
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None) if "cohere" in str(config.model_type) else None
    divisor = getattr(config, "logits_scaling", None) if "granite" in str(config.model_type) else None
    if not (cap or scale or divisor):
        return head

    def capped(hidden: torch.Tensor) -> torch.Tensor:
        logits = head(hidden)
        if scale:
            logits = logits * scale
        if divisor:
            logits = logits / divisor
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return capped


def check_student_vocab(student_vocab: int, tokenizer_size: int, name: str) -> None:
    """One line when the student's embedding has fewer rows than the tokenizer has tokens (ids it cannot hold)."""
    if student_vocab < tokenizer_size:
        raise VocabularyError(
            f"student {name!r} has {student_vocab} embedding rows but its tokenizer has {tokenizer_size} tokens "
            f"(ids {student_vocab}..{tokenizer_size - 1} cannot be represented); use a student with at least "
            f"{tokenizer_size} rows (resize_token_embeddings({tokenizer_size}) and save it)"
        )


POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")
"""Names of learned absolute-position embeddings (GPT-2, OPT, BERT-style): a longer sequence has no row."""


def learned_positions(model) -> int | None:
    """Rows of the model's learned absolute-position table; None for rotary or relative positions (no hard limit)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLES:
            return int(module.num_embeddings)
    return None


def check_student_context(student_positions: int, longest: int, name: str) -> None:
    """One line when a sample is longer than the student's learned positions (it would index past the table)."""
    if longest > student_positions:
        raise VocabularyError(
            f"the dataset's longest sample is {longest} tokens but student {name!r} has learned positions for "
            f"{student_positions}; use a student with a longer context, or regenerate with a smaller "
            "prompts.max_prompt_tokens or generate.max_new_tokens"
        )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_local(name: str, what: str) -> None:
    # A path-looking name that does not exist would otherwise become a confusing hub lookup error.
    if looks_local(name) and not Path(name).expanduser().exists():
        raise ModelLoadError(
            f"{what} path {name!r} does not exist; check the config (or run `make demo` to build the demo teacher)"
        )


def load_tokenizer(name: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """AutoTokenizer with left padding (decoder-only batching) and a pad token guaranteed."""
    from transformers import AutoTokenizer

    _check_local(name, "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelLoadError(f"cannot load tokenizer {name!r}: {str(err).splitlines()[0]}") from None
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    name: str,
    *,
    revision: str | None = None,
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
):
    """AutoModelForCausalLM from safetensors, in eval mode on the resolved device."""
    from transformers import AutoModelForCausalLM

    _check_local(name, "model")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name,
            revision=revision,
            dtype=getattr(torch, dtype),
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )
    except OSError as err:
        raise ModelLoadError(f"cannot load model {name!r}: {str(err).splitlines()[0]}") from None
    # Sampling must follow our config only: transformers fills unset fields from the model's own
    # generation_config (e.g. repetition_penalty=1.05, top_p=0.8 on instruct models).
    from transformers import GenerationConfig

    own = model.generation_config
    model.generation_config = GenerationConfig(
        eos_token_id=own.eos_token_id, pad_token_id=own.pad_token_id, bos_token_id=own.bos_token_id
    )
    return model.to(resolve_device(device)).eval()


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary and special tokens: equal fingerprints mean token ids mean the same."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    specials = {"eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id}
    payload = json.dumps({"vocab": vocab, "specials": specials}, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def eos_ids(tokenizer, model_config=None) -> list[int]:
    """All token ids that end a completion (tokenizer EOS plus any the generation config adds)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model_config, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(ids)


def token_decoder(model: str, fingerprint: str):
    """`id -> text` with the tokenizer of `model` when it loads locally and has `fingerprint`; else None."""
    try:
        tok = load_tokenizer(model)
    except (OSError, UserError):
        return None
    if tokenizer_fingerprint(tok) != fingerprint:
        return None
    return lambda token_id: tok.decode([token_id])


def context_length(name: str, *, revision: str | None = None, trust_remote_code: bool = False) -> int | None:
    """The longest sequence the model's config allows (None when the config does not say)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    config = getattr(config, "text_config", None) or config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def configured_vocab_size(name: str, *, revision: str | None = None, trust_remote_code: bool = False) -> int | None:
    """The embedding rows a model's config declares (`vocab_size`), without loading weights; None if unknown."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    value = getattr(getattr(config, "text_config", None) or config, "vocab_size", None)
    return value if isinstance(value, int) and value > 0 else None


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _teacher_config(teacher_model: str, *, trust_remote_code: bool, why: str):
    from transformers import AutoConfig

    _check_local(teacher_model, "teacher")
    try:
        return AutoConfig.from_pretrained(teacher_model, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelLoadError(
            f"cannot read the teacher config {teacher_model!r} to {why}: {str(err).splitlines()[0]}"
        ) from None


def from_teacher_plan(cfg: StudentConfig, teacher_model: str) -> prune.Plan:
    """What `student.from_teacher` cuts, checked against the teacher's config only (no weights are loaded)."""
    config = _teacher_config(teacher_model, trust_remote_code=cfg.trust_remote_code, why="cut the student from it")
    return prune.plan(cfg.from_teacher, config)


def build_student(cfg: StudentConfig, teacher_model: str, *, seed: int) -> torch.nn.Module:
    """A pretrained student, one cut from the teacher's layers with their weights, or a randomly initialised one
    with the teacher's config shrunk."""
    from transformers import AutoModelForCausalLM

    if cfg.model is not None:
        return load_causal_lm(
            cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, device="cpu", dtype="float32"
        ).train()
    if cfg.from_teacher is not None:
        plan = from_teacher_plan(cfg, teacher_model)  # bad layers or head counts fail before the weights load
        teacher = load_causal_lm(teacher_model, trust_remote_code=cfg.trust_remote_code, device="cpu")
        torch.manual_seed(seed)
        return prune.cut(teacher, plan).train()
    config = _teacher_config(teacher_model, trust_remote_code=cfg.trust_remote_code, why="shrink it")
    sizes = cfg.shrink.model_dump(exclude_none=True)
    types = getattr(config, "layer_types", None)
    if "num_hidden_layers" in sizes and isinstance(types, list):  # Qwen2, Gemma 2/3: one entry per layer, pattern kept
        sizes["layer_types"] = [types[i % len(types)] for i in range(sizes["num_hidden_layers"])]
    for key, value in sizes.items():
        setattr(config, key, value)
    if cfg.shrink.hidden_size and cfg.shrink.head_dim is None and hasattr(config, "head_dim"):
        config.head_dim = config.hidden_size // config.num_attention_heads
    if cfg.shrink.num_attention_heads and cfg.shrink.num_key_value_heads is None:
        config.num_key_value_heads = config.num_attention_heads
    torch.manual_seed(seed)
    # float32 master weights even when the teacher's config says bf16 (autocast handles speed on GPU)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)


def student_tokenizer(cfg: RunConfig, manifest_fingerprint: str):
    """The tokenizer saved with the student; it must be the teacher's (checked by fingerprint)."""
    source = cfg.student.model or cfg.teacher.model
    tok = load_tokenizer(source, revision=cfg.student.revision if cfg.student.model else cfg.teacher.revision)
    found = tokenizer_fingerprint(tok)
    if found != manifest_fingerprint:
        raise TokenizerMismatchError(
            f"student tokenizer {source!r} ({found}) differs from the dataset's teacher tokenizer "
            f"({manifest_fingerprint}); "
            "distillation on top-k ids needs the same tokenizer: pick a student of the teacher's family"
        )
    return tok
