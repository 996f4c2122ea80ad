"""Real model families end to end (issue #19): tiny random Llama 3, Qwen2, Mistral, Gemma 2, Phi-3 and GPT-2
checkpoints with their own tokenizer conventions (pipeline.demo.families) through generate, train and eval.

The core check for every family: the teacher's cached logprobs equal an unpadded transformers forward of the same
tokens, and a student that *is* the teacher scores KL 0 and top-1 agreement 1 against them. That fails if the two
sides disagree on anything the family does differently: Gemma's soft cap, GPT-2's learned positions under padding,
Qwen's padded embedding, a BOS too many."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.config import build_config
from pipeline.dataset.reader import load_samples
from pipeline.demo.families import FAMILIES, GPT2_CONTEXT, build_model
from pipeline.demo.task import make_prompts
from pipeline.evaluate import evaluate
from pipeline.generate import generate_dataset
from pipeline.models import VocabularyError, load_tokenizer, output_head
from pipeline.prompts import PromptsError, load_prompt_set
from pipeline.train import train_student
from tests.helpers import read_rows, server_config

NAMES = list(FAMILIES)
TEMPLATE_WRITES_BOS = {"llama3", "mistral", "gemma2"}


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    """`family -> teacher directory`, each built once per module."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_model(name, tmp_path_factory.mktemp(name) / "teacher", seed=0)
        return built[name]

    return get


def _messages(n: int, *, seed: int = 7) -> list[list[dict]]:
    return [[{"role": "user", "content": p}] for p in make_prompts(n, seed)]


def _write_prompts(path: Path, family: str, n: int = 24) -> Path:
    chat = FAMILIES[family].chat_template is not None
    items = _messages(n) if chat else make_prompts(n, 7)
    path.write_text("".join(json.dumps({"prompt": item}) + "\n" for item in items))
    return path


def _config(family: str, teacher: Path, tmp_path: Path, teacher_section: dict | None = None, **sections):
    raw = {
        "name": family,
        "output_dir": str(tmp_path / "run"),
        "teacher": teacher_section or {"backend": "hf", "model": str(teacher), "batch_size": 8},
        "prompts": {
            "path": str(_write_prompts(tmp_path / "prompts.jsonl", family)),
            "chat_template": FAMILIES[family].chat_template is not None,
            "heldout_fraction": 0.25,
        },
        "generate": {"k": 8, "max_new_tokens": 10, "shard_size": 12, "seed": 0},
        "student": {"shrink": {"num_hidden_layers": 1}},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0, "log_every": 1},
        "eval": {"batch_size": 8},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return build_config(raw)


def _teacher_forced_gap(teacher: Path, dataset: Path) -> tuple[float, float]:
    """Largest |cached - transformers| over the sampled tokens' logprobs and over the top-k logprobs, each sample
    run alone (no padding) through the full `model(...)` forward."""
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    rows = read_rows(dataset)
    sampled = topk = 0.0
    for prompt, completion, token_lp, ids, lps in zip(
        rows.prompt_tokens, rows.completion_tokens, rows.token_logprobs, rows.topk_ids, rows.topk_logprobs
    ):
        seq = torch.tensor(np.concatenate([prompt, completion]))[None]
        with torch.no_grad():
            logp = model(seq).logits[0, len(prompt) - 1 : -1].log_softmax(-1).numpy()
        sampled = max(sampled, float(np.abs(logp[np.arange(len(completion)), completion] - token_lp).max()))
        topk = max(topk, float(np.abs(np.take_along_axis(logp, ids, 1) - lps).max()))
    return sampled, topk


def _student_is_teacher(cfg, teacher: Path, tmp_path: Path) -> tuple[dict, float]:
    """metrics.json of the teacher itself evaluated as the student against its own cached held-out samples, and the
    KL that must give: the metric renormalises the teacher over its top-k (the student is not), so a student equal
    to the teacher scores the mean of -log(top-k mass) over the held-out positions, not 0."""
    student = tmp_path / "teacher-as-student"
    student.mkdir()
    for f in teacher.iterdir():
        (student / f.name).write_bytes(f.read_bytes())
    metrics = evaluate(cfg, student_dir=student, metrics_path=tmp_path / "self-metrics.json")["student"]
    heldout = np.concatenate(load_samples(cfg.dataset_dir, split="heldout").topk_logprobs).astype(np.float64)
    return metrics, float(np.mean(-np.log(np.exp(heldout).sum(-1))))


# --- fast: the head, the prompts, the transformers teacher ----------------------------------------------------------


@pytest.mark.parametrize("family", NAMES)
def test_head_on_gathered_positions_equals_the_models_forward(family, family_dir):
    """Losses, metrics and the scoring teacher run the LM head on gathered hidden states: for Gemma 2 that must
    include the final-logit soft cap its forward applies (without it logits differ by up to ~10 here)."""
    model = AutoModelForCausalLM.from_pretrained(family_dir(family)).eval()
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        hidden = getattr(model, model.base_model_prefix)(input_ids=ids).last_hidden_state
        torch.testing.assert_close(output_head(model)(hidden), full, rtol=0, atol=1e-5)
        plain = model.get_output_embeddings()(hidden)
    assert (plain - full).abs().max() > 1.0 if family == "gemma2" else torch.equal(plain, full)


@pytest.mark.parametrize("family", NAMES)
def test_prompt_ids_are_what_transformers_renders_with_one_bos_at_most(family, family_dir, tmp_path):
    teacher = family_dir(family)
    tok = load_tokenizer(str(teacher))
    fam = FAMILIES[family]
    cfg = _config(family, teacher, tmp_path).prompts
    prompts = load_prompt_set(cfg, tok)
    bos = tok.bos_token_id
    if fam.chat_template:
        want = [
            tok.apply_chat_template(m, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
            for m in _messages(24)
        ]
        assert prompts.token_ids == want
        # the template writes BOS and the tokenizer would add another: encoded without specials, once
        bos_count = 1 if family in TEMPLATE_WRITES_BOS else 0
        assert all(ids.count(bos) == bos_count for ids in prompts.token_ids) if bos is not None else True
    else:
        assert prompts.token_ids == [tok(p)["input_ids"] for p in make_prompts(24, 7)]
    path = tmp_path / "plain.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in make_prompts(4, 7)))
    plain = load_prompt_set(cfg.model_copy(update={"chat_template": False, "path": str(path)}), tok)
    starts_with_bos = [ids[0] == bos for ids in plain.token_ids]
    assert starts_with_bos == [fam.add_bos] * 4
    assert all(ids[1] != bos for ids in plain.token_ids)


def test_system_turns_render_through_the_template_and_a_rejected_role_is_one_line(family_dir, tmp_path):
    qwen = load_tokenizer(str(family_dir("qwen2")))
    chat = [{"role": "system", "content": "sort well"}, {"role": "user", "content": "pick: a b c d e f ="}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": chat}) + "\n")
    cfg = _config("qwen2", family_dir("qwen2"), tmp_path).prompts.model_copy(update={"path": str(path)})
    (text,) = load_prompt_set(cfg, qwen).texts
    assert text.startswith("<|im_start|>system\nsort well<|im_end|>\n<|im_start|>user\n")  # not the default system
    assert text.endswith("<|im_start|>assistant\n") and "helpful assistant" not in text
    mistral = load_tokenizer(str(family_dir("mistral")))
    with pytest.raises(PromptsError) as err:
        load_prompt_set(cfg, mistral)
    assert "chat template rejects it: Only user and assistant roles are supported!" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("family", NAMES)
def test_family_generates_trains_and_evaluates_through_transformers(family, family_dir, tmp_path):
    teacher = family_dir(family)
    cfg = _config(family, teacher, tmp_path)
    generated = generate_dataset(cfg, progress=False)
    assert generated.samples == 24
    sampled, topk = _teacher_forced_gap(teacher, Path(generated.dataset_dir))
    # left-padded batched generation equals one unpadded forward (logits of std ~10 here: float32 noise ~4e-3;
    # a cap, a position or a BOS gone wrong moves them by 1 to 15)
    assert sampled < 2e-2 and topk < 2e-2

    own, expected_kl = _student_is_teacher(cfg, teacher, tmp_path)
    assert (
        own["kl"] == pytest.approx(expected_kl, abs=2e-3) and own["top1_agreement"] == 1.0
    )  # first order in the noise

    result = train_student(cfg, progress=False)
    log = json.loads((Path(result.student_dir) / "train_log.json").read_text())
    assert [row["step"] for row in log["history"]] == [1, 2, 3]
    assert all(np.isfinite(row["loss"]) for row in log["history"])
    student = AutoModelForCausalLM.from_pretrained(result.student_dir)
    assert type(student).__name__ == FAMILIES[family].architecture
    assert student.config.num_hidden_layers == 1
    metrics = evaluate(cfg)
    assert np.isfinite(metrics["student"]["kl"]) and metrics["student"]["kl"] > own["kl"]


def test_prompts_past_the_teacher_context_are_skipped_and_counted(family_dir, tmp_path):
    """GPT-2's 64 learned positions: a prompt that leaves fewer than max_new_tokens positions is skipped (vLLM
    would refuse it, transformers would index past the table); with on_invalid: fail it is one line."""
    teacher = family_dir("gpt2")
    tok = load_tokenizer(str(teacher))
    short = make_prompts(8, 3)
    long = [" ".join([p] * 6) for p in make_prompts(3, 4)]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in [*short[:4], *long, *short[4:]]))
    assert all(len(tok(p)["input_ids"]) + 10 > GPT2_CONTEXT for p in long)
    cfg = _config("gpt2", teacher, tmp_path, prompts={"path": str(path), "heldout_fraction": 0.25})
    result = generate_dataset(cfg, progress=False)
    manifest = json.loads((Path(result.dataset_dir) / "manifest.json").read_text())
    assert manifest["skipped_prompts"] == {"too_long": 3} and manifest["num_prompts"] == 8
    rows = read_rows(Path(result.dataset_dir))
    assert max(len(p) + len(c) for p, c in zip(rows.prompt_tokens, rows.completion_tokens)) <= GPT2_CONTEXT

    (tmp_path / "strict").mkdir()
    strict = _config("gpt2", teacher, tmp_path / "strict", prompts={"path": str(path), "on_invalid": "fail"})
    with pytest.raises(PromptsError) as err:
        generate_dataset(strict, progress=False)
    assert "prompt 5 is" in str(err.value) and f"over the teacher's context of {GPT2_CONTEXT}" in str(err.value)


# --- slow: the same families through a real vLLM server -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", NAMES)
def test_family_through_the_vllm_server_matches_transformers(family, family_dir, tmp_path):
    """vLLM's logprobs (raw, float32) equal transformers' forward to 1e-2 for every family, and the teacher as
    its own student scores the KL of an exact match against them: both sides apply Gemma's cap, GPT-2's
    positions, Qwen's biases."""
    teacher = family_dir(family)
    context = GPT2_CONTEXT if family == "gpt2" else 128
    section = server_config(teacher, max_model_len=context).model_dump()
    cfg = _config(family, teacher, tmp_path, teacher_section=section)
    generated = generate_dataset(cfg, progress=False)
    assert generated.samples == 24
    sampled, topk = _teacher_forced_gap(teacher, Path(generated.dataset_dir))
    assert sampled < 1e-2 and topk < 1e-2
    own, expected_kl = _student_is_teacher(cfg, teacher, tmp_path)
    assert own["kl"] == pytest.approx(expected_kl, abs=5e-3) and own["top1_agreement"] > 0.99


def test_a_student_with_fewer_learned_positions_than_the_longest_sample_is_one_line(family_dir, tmp_path):
    """GPT-2's position table has no row past n_positions: caught before training, not as an index error."""
    teacher = family_dir("gpt2")
    cfg = _config("gpt2", teacher, tmp_path)
    generate_dataset(cfg, progress=False)
    short = AutoModelForCausalLM.from_pretrained(teacher)
    short.config.n_positions = 16
    student = tmp_path / "short-context"
    type(short)(short.config).save_pretrained(student)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (student / name).write_bytes((teacher / name).read_bytes())
    rows = read_rows(cfg.dataset_dir)
    longest = max(len(p) + len(c) for p, c in zip(rows.prompt_tokens, rows.completion_tokens))
    cfg = _config("gpt2", teacher, tmp_path, student={"model": str(student), "shrink": None})
    with pytest.raises(VocabularyError) as err:
        train_student(cfg, progress=False)
    assert str(err.value).startswith(f"the dataset's longest sample is {longest} tokens but student")
    assert "has learned positions for 16;" in str(err.value)
    assert not (cfg.student_dir / "model.safetensors").exists()


@pytest.mark.parametrize("family", NAMES)
def test_a_student_cut_from_the_teacher_keeping_everything_is_the_teacher(family, family_dir):
    """`student.from_teacher` copies every weight the family has (tied embeddings, Gemma's four norms per layer,
    Phi-3's fused projections, GPT-2's positions): keeping all layers, and narrowing to the teacher's own sizes
    where the family can be narrowed, gives the teacher's logits. Phi-3 and GPT-2 narrowing is one line."""
    from pipeline.config import ConfigError, FromTeacherConfig, StudentConfig
    from pipeline.models import build_student

    teacher_dir = family_dir(family)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(1))
    c = teacher.config
    same_sizes = {
        "hidden_size": c.hidden_size,
        "intermediate_size": getattr(c, "intermediate_size", None),
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": getattr(c, "num_key_value_heads", None),
    }
    specs = [{}, {"layers": "every_other"}, same_sizes]
    with torch.no_grad():
        want = teacher(ids).logits
        for spec in specs:
            cut = StudentConfig(from_teacher=FromTeacherConfig(**{k: v for k, v in spec.items() if v is not None}))
            if spec is same_sizes and family in ("phi3", "gpt2"):
                with pytest.raises(ConfigError, match="narrow"):
                    build_student(cut, str(teacher_dir), seed=0)
                continue
            student = build_student(cut, str(teacher_dir), seed=0).eval()
            assert type(student) is type(teacher)
            if spec.get("layers") == "every_other":
                assert student.config.num_hidden_layers == 1
                continue
            torch.testing.assert_close(student(ids).logits, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", NAMES)
def test_the_live_teacher_families_train_on_every_family(family, family_dir, tmp_path):
    """Feature, attention and relation losses read each family's layers and q/k/v (Phi-3's fused qkv_proj, GPT-2's
    c_attn) from a shrunk student of the same family: every part is logged, finite and positive."""
    teacher = family_dir(family)
    live = {"live_teacher": True, **{f: {"weight": 0.5} for f in ("feature", "attention", "relation")}}
    cfg = _config(family, teacher, tmp_path, train={"max_steps": 2, **live})
    generate_dataset(cfg, progress=False)
    result = train_student(cfg, progress=False)
    history = json.loads((Path(result.student_dir) / "train_log.json").read_text())["history"]
    assert [row["step"] for row in history] == [1, 2]
    for row in history:
        assert all(np.isfinite(row[part]) and row[part] > 0 for part in ("feature", "attention", "relation"))
