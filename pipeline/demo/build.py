"""Build the demo teacher: a byte-level BPE tokenizer and a tiny Llama trained on the demo task.

The result is a plain Hugging Face directory (safetensors, config, generation config, tokenizer)
that both transformers and vLLM load, plus a ``distill_demo.json`` marker written last.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipeline.demo import task

MARKER = "distill_demo.json"
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
TRAIN_SEED_OFFSET = 0
EVAL_SEED_OFFSET = 1_000_003  # held-out prompts come from a stream the training never sees


def train_tokenizer(out_dir: Path, *, seed: int = 0) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the task corpus so every symbol and template word is one token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,  # more than the corpus can fill: training stops once every word is merged
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Counts of 5 or 6 are too rare to be sampled, so one line lists every symbol and count.
    every_word = " ".join([*task.LETTERS, *(str(i) for i in range(1, task.N_SYMBOLS + 1))])
    tok.train_from_iterator([every_word, *task.corpus(2_000, seed)], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="left"
    )
    fast.save_pretrained(out_dir)
    return fast


def teacher_config(vocab_size: int, *, bos_id: int = 0, eos_id: int = 1, pad_id: int = 2) -> LlamaConfig:
    """Return the teacher's Llama config: d=128, 4 layers, 4 heads of 32 (a head size vLLM supports)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
        max_position_embeddings=128,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
    )


def make_batch(tok: PreTrainedTokenizerFast, rng: random.Random, n: int) -> dict[str, torch.Tensor]:
    """Return n fresh right-padded sequences prompt+completion+eos; loss on completion and eos only."""
    prompts = [task.make_prompt(rng) for _ in range(n)]
    completions = [task.sample_completion(p, rng) for p in prompts]
    p_ids = tok(prompts, add_special_tokens=False).input_ids
    c_ids = tok(completions, add_special_tokens=False).input_ids
    width = max(len(p) + len(c) + 1 for p, c in zip(p_ids, c_ids))
    input_ids = torch.full((n, width), tok.pad_token_id)
    labels = torch.full((n, width), -100)
    for i, (p, c) in enumerate(zip(p_ids, c_ids)):
        seq = p + c + [tok.eos_token_id]
        input_ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(p) : len(seq)] = torch.tensor(seq[len(p) :])
    return {"input_ids": input_ids, "attention_mask": input_ids != tok.pad_token_id, "labels": labels}


def lr_at(progress: float, *, peak: float, warmup: float = 0.03, floor: float = 0.1) -> float:
    """Linear warmup then cosine decay to floor * peak, as a function of progress in [0, 1]."""
    if progress < warmup:
        return peak * progress / warmup
    t = min(1.0, (progress - warmup) / (1 - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def train(
    model: LlamaForCausalLM,
    tok: PreTrainedTokenizerFast,
    *,
    seed: int,
    max_steps: int | None,
    max_seconds: float,
    batch_size: int = 128,
    peak_lr: float = 3e-3,
    log: Callable[[str], None],
) -> dict:
    """Train on fresh samples every step until max_steps or max_seconds; progress drives the LR: the step count when
    there is a step budget (the same teacher on a slow or busy machine), else the elapsed time."""
    rng = random.Random(seed + TRAIN_SEED_OFFSET)
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    start, step, tokens = time.perf_counter(), 0, 0
    while True:
        elapsed = time.perf_counter() - start
        progress = step / max_steps if max_steps is not None else elapsed / max_seconds
        if progress >= 1.0 or elapsed >= max_seconds:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(progress, peak=peak_lr)
        batch = make_batch(tok, rng, batch_size)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step, tokens = step + 1, tokens + int(batch["attention_mask"].sum())
        if step % 100 == 0:
            log(f"step {step} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e} {elapsed:.0f}s")
    seconds = time.perf_counter() - start
    model.eval()
    return {"steps": step, "seconds": round(seconds, 1), "train_tokens_per_s": round(tokens / seconds)}


@torch.no_grad()
def accuracy(
    model: LlamaForCausalLM,
    tok: PreTrainedTokenizerFast,
    prompts: list[str],
    *,
    do_sample: bool,
    seed: int = 0,
    batch_size: int = 500,
) -> float:
    """Fraction of prompts whose generated completion passes task.check (greedy or temperature 1)."""
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if do_sample else {"do_sample": False}
    correct = 0
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        enc = tok(chunk, add_special_tokens=False, padding=True, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=32, pad_token_id=tok.pad_token_id, **sampling)
        texts = tok.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
        correct += sum(task.check(p, c) for p, c in zip(chunk, texts))
    return correct / len(prompts)


@torch.no_grad()
def draw_kl(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, prompts: list[str], *, seed: int = 0) -> list[float]:
    """Mean KL(true || teacher) at each draw position, teacher-forced on ground-truth completions."""
    rng = random.Random(seed)
    symbol_ids = [tok.convert_tokens_to_ids(tok.tokenize(" " + s))[0] for s in task.LETTERS]
    kls = torch.zeros(task.N_DRAWS)
    for prompt in prompts:
        completion = task.sample_completion(prompt, rng)
        p_ids = tok(prompt, add_special_tokens=False).input_ids
        c_ids = tok(completion, add_special_tokens=False).input_ids
        logp = model(torch.tensor([p_ids + c_ids])).logits[0].log_softmax(-1)
        true = task.draw_distribution(prompt)
        for d, word in enumerate(task.DRAW_WORDS):  # each completion word is exactly one token
            row = logp[len(p_ids) + word - 1]
            kls[d] += sum(p * (math.log(p) - row[symbol_ids[task.LETTERS.index(s)]].item()) for s, p in true.items())
    return (kls / len(prompts)).tolist()


def build_teacher(
    out_dir: Path,
    *,
    seed: int = 0,
    max_steps: int | None = None,
    max_seconds: float = 180.0,
    eval_prompts: int = 1_000,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train tokenizer and teacher, evaluate, and move the finished directory into out_dir."""
    log = log or (lambda _msg: None)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        torch.manual_seed(seed)
        tok = train_tokenizer(tmp, seed=seed)
        ids = tok.convert_tokens_to_ids([BOS, EOS, PAD])
        config = teacher_config(len(tok), bos_id=ids[0], eos_id=ids[1], pad_id=ids[2])
        model = LlamaForCausalLM(config)
        params = sum(p.numel() for p in model.parameters())
        log(f"demo teacher: {params / 1e6:.2f}M params, vocab {len(tok)}")
        stats = train(model, tok, seed=seed, max_steps=max_steps, max_seconds=max_seconds, log=log)
        model.generation_config = GenerationConfig(
            bos_token_id=ids[0], eos_token_id=ids[1], pad_token_id=ids[2], max_new_tokens=32
        )
        model.save_pretrained(tmp)
        held_out = task.make_prompts(eval_prompts, seed + EVAL_SEED_OFFSET)
        marker = {
            "version": task.TASK_VERSION,
            "seed": seed,
            **stats,
            "greedy_accuracy": accuracy(model, tok, held_out, do_sample=False),
            "sampled_accuracy": accuracy(model, tok, held_out, do_sample=True, seed=seed),
            "draw_kl": [round(k, 4) for k in draw_kl(model, tok, held_out[: min(500, eval_prompts)], seed=seed)],
            "params": params,
            "vocab_size": len(tok),
        }
        log(f"demo teacher: {json.dumps(marker)}")
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return marker


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename src to dst, replacing dst only if it is empty or an older demo teacher."""
    if dst.exists():
        if any(dst.iterdir()) and not (dst / MARKER).exists():
            raise FileExistsError(f"{dst} exists and is not a demo teacher; refusing to replace it")
        shutil.rmtree(dst)
    src.rename(dst)


def read_marker(out_dir: Path) -> dict | None:
    """Return the marker of a finished demo teacher of the current task version, else None."""
    path = Path(out_dir) / MARKER
    try:
        marker = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return marker if marker.get("version") == task.TASK_VERSION else None


def ensure_demo_teacher(
    out_dir: Path,
    *,
    seed: int = 0,
    max_steps: int | None = 750,
    max_seconds: float = 1800.0,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Return out_dir, building the demo teacher there first unless a current one is present.

    A step budget (not a time budget) keeps the teacher the same on a slow or busy machine.
    """
    out_dir = Path(out_dir)
    if read_marker(out_dir) is None:
        build_teacher(out_dir, seed=seed, max_steps=max_steps, max_seconds=max_seconds, log=log)
    elif log:
        log(f"demo teacher: using {out_dir}")
    return out_dir
