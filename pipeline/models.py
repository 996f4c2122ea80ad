"""Loading models and tokenizers with the real `from_pretrained` (path or hub id), and their fingerprints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from pipeline.core import UserError, looks_local


class ModelLoadError(UserError):
    """A model or tokenizer that cannot be loaded, stated in one line."""


class TokenizerMismatchError(UserError):
    """Student and teacher tokenizers differ: top-k ids would point at the wrong tokens."""


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
