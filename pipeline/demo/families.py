"""Tiny random checkpoints of real model families, saved as the hub ships them, to run the pipeline on their quirks.

Each family gets its own config class from transformers, and a byte-level BPE tokenizer trained on the demo corpus
with that family's special tokens, BOS convention, generation-config EOS list and chat template (Jinja in
`tokenizer_config.json`, as on the hub). What the families bring:

- llama3:  BOS added by the tokenizer *and* written by the chat template; no pad token; two EOS ids.
- qwen2:   no BOS at all; q/k/v biases; tied embeddings; ChatML with a default system turn; an embedding matrix
           padded past the tokenizer (the teacher scores ids no token has).
- mistral: BOS added and in the template; no pad token; `[INST]` turns; no system role.
- gemma2:  final-logit and attention-logit soft-capping, embeddings scaled by sqrt(d), tied embeddings,
           alternating sliding-window layers, BOS in the template, two EOS ids.
- phi3:    fused `qkv_proj` / `gate_up_proj`; BOS added by the tokenizer but not in the template; two EOS ids.
- gpt2:    learned absolute positions with a short context (`n_positions`), BOS = EOS, no pad token, no chat
           template, Conv1D projections.

The weights are random but spread out (`logit_scale`), so the teacher's distributions are peaked rather than
uniform and a difference in where a cap or a scale is applied shows in the numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from pipeline.demo import task

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """One family's conventions: special tokens, whether the tokenizer adds BOS, its chat template and EOS list."""

    name: str
    architecture: str
    bos: str | None
    eos: str
    pad: str | None
    add_bos: bool
    chat_template: str | None
    stop: tuple[str, ...] = ()
    """Further EOS tokens of the generation config (end of turn)."""
    extra: tuple[str, ...] = ()
    """Other special tokens the chat template writes."""
    system_role: bool = True
    vocab_multiple: int = 1
    """Embedding rows rounded up to this multiple (rows past the tokenizer: padding, as Qwen ships)."""
    config: dict = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            "llama3",
            "LlamaForCausalLM",
            bos="<|begin_of_text|>",
            eos="<|end_of_text|>",
            pad=None,
            add_bos=True,
            chat_template=LLAMA3_TEMPLATE,
            stop=("<|eot_id|>",),
            extra=("<|start_header_id|>", "<|end_header_id|>"),
            config={"num_key_value_heads": 1, "rope_theta": 500000.0, "tie_word_embeddings": False},
        ),
        Family(
            "qwen2",
            "Qwen2ForCausalLM",
            bos=None,
            eos="<|endoftext|>",
            pad="<|endoftext|>",
            add_bos=False,
            chat_template=CHATML_TEMPLATE,
            stop=("<|im_end|>",),
            extra=("<|im_start|>",),
            vocab_multiple=64,
            config={"num_key_value_heads": 1, "tie_word_embeddings": True},
        ),
        Family(
            "mistral",
            "MistralForCausalLM",
            bos="<s>",
            eos="</s>",
            pad=None,
            add_bos=True,
            chat_template=MISTRAL_TEMPLATE,
            system_role=False,
            config={"num_key_value_heads": 1, "sliding_window": None, "tie_word_embeddings": False},
        ),
        Family(
            "gemma2",
            "Gemma2ForCausalLM",
            bos="<bos>",
            eos="<eos>",
            pad="<pad>",
            add_bos=True,
            chat_template=GEMMA_TEMPLATE,
            stop=("<end_of_turn>",),
            extra=("<start_of_turn>",),
            system_role=False,
            config={
                "num_key_value_heads": 1,
                "query_pre_attn_scalar": 32,
                "final_logit_softcapping": 30.0,
                "attn_logit_softcapping": 50.0,
                "sliding_window": 16,
                "tie_word_embeddings": True,
            },
        ),
        Family(
            "phi3",
            "Phi3ForCausalLM",
            bos="<s>",
            eos="<|endoftext|>",
            pad="<|endoftext|>",
            add_bos=True,
            chat_template=PHI3_TEMPLATE,
            stop=("<|end|>",),
            extra=("<|user|>", "<|assistant|>", "<|system|>"),
            config={"num_key_value_heads": 2, "tie_word_embeddings": False},
        ),
        Family(
            "gpt2",
            "GPT2LMHeadModel",
            bos="<|endoftext|>",
            eos="<|endoftext|>",
            pad=None,
            add_bos=False,
            chat_template=None,
            config={},
        ),
    ]
}

HIDDEN, HEADS, HEAD_DIM, LAYERS, CONTEXT = 64, 2, 32, 2, 256
GPT2_CONTEXT = 64
"""GPT-2's learned positions: a context short enough that a demo prompt plus its completion can overrun it."""


def build_tokenizer(family: Family, out_dir: Path, *, seed: int = 0):
    """A byte-level BPE on the demo corpus with the family's special tokens, BOS rule and chat template."""
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys(t for t in (family.bos, family.eos, family.pad, *family.stop, *family.extra) if t))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = " ".join([*task.LETTERS, *(str(i) for i in range(1, task.N_SYMBOLS + 1))])
    chat_words = "system user assistant model helpful You are a [INST] [/INST]"
    tok.train_from_iterator([words, chat_words, *task.corpus(2_000, seed)], trainer=trainer)
    if family.add_bos:
        bos_id = tok.token_to_id(family.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos} $B", special_tokens=[(family.bos, bos_id)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        additional_special_tokens=[t for t in (*family.stop, *family.extra) if t not in (family.eos, family.pad)],
    )
    if family.chat_template:
        fast.chat_template = family.chat_template
    fast.save_pretrained(out_dir)
    return fast


def model_config(family: Family, tokenizer, *, scale: float = 1.0, layers: int = LAYERS):
    """The family's config class at tiny size (`scale` narrows the width and the MLP, for a student)."""
    import transformers

    rows = -(-len(tokenizer) // family.vocab_multiple) * family.vocab_multiple
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    ids["pad_token_id"] = tokenizer.pad_token_id
    hidden = int(HIDDEN * scale)
    kv_heads = min(family.config.get("num_key_value_heads", 1), hidden // HEAD_DIM)
    if family.name == "gpt2":
        return transformers.GPT2Config(
            vocab_size=rows, n_embd=hidden, n_layer=layers, n_head=hidden // HEAD_DIM, n_positions=GPT2_CONTEXT, **ids
        )
    config_class = getattr(transformers, family.architecture.replace("ForCausalLM", "Config"))
    return config_class(
        vocab_size=rows,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // HEAD_DIM,
        head_dim=HEAD_DIM,
        max_position_embeddings=CONTEXT,
        **{**family.config, "num_key_value_heads": kv_heads},
        **ids,
    )


def final_norm(model) -> torch.nn.Module:
    """The norm before the LM head (Llama-style `model.norm`, GPT-2 `transformer.ln_f`)."""
    return model.transformer.ln_f if hasattr(model, "transformer") else model.model.norm


def spread_logits(model, factor: float) -> None:
    """Multiply the output logits by `factor` through the final norm's gain (Gemma's norm computes 1 + weight)."""
    norm = final_norm(model)
    with torch.no_grad():
        if type(norm).__name__.startswith("Gemma"):
            norm.weight.copy_((1 + norm.weight) * factor - 1)
        else:
            norm.weight.mul_(factor)
            if getattr(norm, "bias", None) is not None:
                norm.bias.mul_(factor)


def build_model(family: str, out_dir: Path, *, seed: int = 0, logit_scale: float = 60.0, scale: float = 1.0) -> Path:
    """Save a tiny random `family` checkpoint with its tokenizer and generation config to `out_dir`."""
    import transformers

    fam = FAMILIES[family]
    out_dir = Path(out_dir)
    tok = build_tokenizer(fam, out_dir, seed=seed)
    config = model_config(fam, tok, scale=scale)
    torch.manual_seed(seed)
    model = getattr(transformers, fam.architecture)(config)
    spread_logits(model, logit_scale)
    eos = [tok.convert_tokens_to_ids(t) for t in (fam.eos, *fam.stop)]
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=eos if len(eos) > 1 else eos[0], pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out_dir)
    (out_dir / "distill_family.json").write_text(json.dumps({"family": family, "seed": seed}) + "\n")
    return out_dir
