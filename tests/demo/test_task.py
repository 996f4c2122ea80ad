"""Tests for the demo task, its tokenizer and the demo-teacher build (tiny, CPU, a few seconds)."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.demo import build, task


def _samples(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    prompts = task.make_prompts(n, seed)
    return [(p, task.sample_completion(p, rng)) for p in prompts]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build.train_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("teachers") / "demo"
    marker = build.build_teacher(out, max_steps=20, max_seconds=900, eval_prompts=40)  # steps, not time, bound it
    return out, marker


def test_prompts_are_deterministic_per_seed():
    assert task.make_prompts(50, seed=1) == task.make_prompts(50, seed=1)
    assert task.make_prompts(50, seed=1) != task.make_prompts(50, seed=2)
    for p in task.make_prompts(50, seed=1):
        assert len(task.prompt_symbols(p)) == task.N_SYMBOLS


def test_write_prompts_jsonl(tmp_path):
    path = task.write_prompts_jsonl(tmp_path / "sub" / "prompts.jsonl", n=7, seed=3)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"prompt": p} for p in task.make_prompts(7, seed=3)]


def test_sampled_completions_pass_check():
    for prompt, completion in _samples(2_000, seed=0):
        assert task.check(prompt, completion), (prompt, completion)
        assert task.check(prompt, "  " + completion.strip() + "\n")


def test_draws_follow_the_true_distribution():
    prompt = "pick: a b b c c c ="
    rng = random.Random(0)
    draws = Counter(task.sample_completion(prompt, rng).split()[0] for _ in range(6_000))
    for symbol, p in task.draw_distribution(prompt).items():
        assert abs(draws[symbol] / 6_000 - p) < 0.03


def _wrong(prompt: str, completion: str) -> list[str]:
    """Corruptions of a correct completion that must all fail the check."""
    symbols = task.prompt_symbols(prompt)
    words = completion.split()
    absent = next(s for s in task.LETTERS if s not in symbols)
    bad_count = [*words[:1], str(int(words[1]) + 1), *words[2:]]
    bad_draw = [absent, *words[1:]]
    bad_sort = [*words[:-6], *reversed(words[-6:])] if len(set(symbols)) > 1 else words[:-1]
    return [
        " ".join(bad_count),
        " ".join(bad_draw),
        " ".join(bad_sort),
        completion + " a",
        completion.replace(" ; ", " ;  ", 1),
        completion.replace(" |", ""),
        " ".join(words[3:]),
        completion.replace(" ;", ","),
    ]


def test_wrong_completions_fail_check():
    for prompt, completion in _samples(200, seed=1):
        for wrong in _wrong(prompt, completion):
            assert not task.check(prompt, wrong), (prompt, wrong)


def test_tokenizer_round_trips_and_symbols_are_single_tokens(tok):
    assert 259 < len(tok) < 400
    assert tok.padding_side == "left" and tok.eos_token_id != tok.pad_token_id
    words = [f" {s}" for s in task.LETTERS] + [f" {i}" for i in range(1, task.N_SYMBOLS + 1)]
    for word in words + [task.DRAW_SEP, task.SORT_SEP, " " + task.SUFFIX]:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    for prompt, completion in _samples(200, seed=2):
        ids = tok(prompt + completion, add_special_tokens=False).input_ids
        assert tok.decode(ids) == prompt + completion
        assert len(ids) == len(prompt.split()) + len(completion.split()) + 1  # "pick" ":" ...


def test_separate_tokenization_matches_training_sequences(tok):
    seed = 5
    batch = build.make_batch(tok, random.Random(seed), 16)
    rng = random.Random(seed)
    prompts = [task.make_prompt(rng) for _ in range(16)]
    completions = [task.sample_completion(p, rng) for p in prompts]
    for row, labels, prompt, completion in zip(batch["input_ids"], batch["labels"], prompts, completions):
        p_ids = tok(prompt, add_special_tokens=False).input_ids
        c_ids = tok(completion, add_special_tokens=False).input_ids
        assert p_ids + c_ids == tok(prompt + completion, add_special_tokens=False).input_ids
        seq = p_ids + c_ids + [tok.eos_token_id]
        assert row[: len(seq)].tolist() == seq
        assert (labels[: len(p_ids)] == -100).all()
        assert labels[len(p_ids) : len(seq)].tolist() == seq[len(p_ids) :]


@pytest.mark.teacher  # trains a demo teacher (a minute or more on 2 cores)
def test_build_teacher_writes_loadable_hf_dir(teacher):
    out, marker = teacher
    for name in ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json"]:
        assert (out / name).is_file(), name
    assert json.loads((out / build.MARKER).read_text()) == marker
    assert marker["version"] == task.TASK_VERSION and marker["steps"] == 20
    assert 0.0 <= marker["sampled_accuracy"] <= 1.0
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.head_dim == 32 and model.config.eos_token_id == tok.eos_token_id
    ids = tok(["pick: a b c d e f ="], return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))


def test_ensure_skips_when_marker_present(teacher, monkeypatch):
    out, _ = teacher
    monkeypatch.setattr(build, "build_teacher", lambda *a, **k: pytest.fail("rebuilt"))
    assert build.ensure_demo_teacher(out) == out


def test_ensure_rebuilds_stale_version(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(build, "build_teacher", lambda out, **k: calls.append(out))
    (tmp_path / build.MARKER).write_text(json.dumps({"version": task.TASK_VERSION - 1}))
    build.ensure_demo_teacher(tmp_path)
    assert calls == [tmp_path]


def test_the_shipped_sft_set_is_ground_truth_and_reproducible(tmp_path):
    """data/demo/sft.jsonl (the re-score demo's "text the user already has") is what write_sft_jsonl makes, and
    every completion passes the task's checker."""
    shipped = Path(__file__).resolve().parents[2] / "data" / "demo" / "sft.jsonl"
    made = task.write_sft_jsonl(tmp_path / "sft.jsonl", n=3000, seed=7)
    assert made.read_bytes() == shipped.read_bytes()
    rows = [json.loads(line) for line in shipped.read_text().splitlines()]
    assert len(rows) == 3000 and all(task.check(r["prompt"], r["completion"]) for r in rows)


def test_a_step_budget_alone_drives_the_teachers_schedule(tok, monkeypatch):
    """On a slow machine (here every clock reading is 300 s later) the learning-rate schedule still follows the
    steps, so `make demo` builds the same teacher; the time budget only stops training."""
    import itertools

    from transformers import LlamaForCausalLM

    clock = itertools.count(0.0, 300.0)
    monkeypatch.setattr(build.time, "perf_counter", lambda: next(clock))
    seen = []
    monkeypatch.setattr(build, "lr_at", lambda progress, peak: seen.append(progress) or peak)
    ids = tok.convert_tokens_to_ids([build.BOS, build.EOS, build.PAD])
    model = LlamaForCausalLM(build.teacher_config(len(tok), bos_id=ids[0], eos_id=ids[1], pad_id=ids[2]))
    stats = build.train(model, tok, seed=0, max_steps=4, max_seconds=1000, batch_size=2, log=lambda _m: None)
    assert seen == [0.0, 0.25, 0.5] and stats["steps"] == 3  # the 4th step is past the 1000 s cap
