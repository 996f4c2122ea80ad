"""Every number in metrics.json against an independent computation on a case where the answer is known.

The dataset's top-k comes from the student itself, position by position, in known ways: the student's own top-k
and logprobs (the student agrees with the teacher), its top-2 swapped (the student always picks the teacher's
second token), a peaked teacher on the student's ranking (a deterministic position), and a teacher that returned
only k-1 entries. The expected numbers are plain NumPy on the student's logits from one unpadded forward pass per
sample and on the Parquet rows as written; evaluation computes them through the stream, the padded batches, the
chunked LM head and the losses. Accuracy uses a checker that accepts known completions only (the teacher's first
sample for some prompts, the student's greedy completion, decoded by hand, for others).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import pipeline.demo.task as demo_task
from pipeline.config import RunConfig
from pipeline.core import stable_id
from pipeline.dataset.schema import Generation, build_table
from pipeline.dataset.writer import commit_shard, write_manifest, write_shard
from pipeline.evaluate import evaluate
from tests.helpers import tiny_manifest

K, N_PROMPTS, N_SAMPLES, HELDOUT, MAX_NEW = 4, 10, 2, 0.5, 5
MODES = ("same", "second", "peaked", "short")
PEAKED = np.log([0.97, 0.01, 0.01, 0.005])  # entropy over k+1 buckets ~0.18 nats: a deterministic position


def _heldout(prompt_id: str) -> bool:
    """The documented split rule, written out: the first 8 hex digits over 2^32 below the fraction."""
    return int(prompt_id[:8], 16) / 2**32 < HELDOUT


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _full_logits(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0].double().numpy()


def _teacher_topk(logq: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's top-k ids and logprobs at one position, built from the student's log-probabilities."""
    rank = np.argsort(-logq)
    ids, lp = rank[:K].copy(), logq[rank[:K]].copy()
    if mode == "second":
        ids[[0, 1]] = ids[[1, 0]]  # logprobs stay sorted: the teacher's first token is the student's second
    elif mode == "peaked":
        lp = PEAKED.copy()
    elif mode == "short":
        lp[-1] = -np.inf  # a teacher that returned k-1 entries
    return ids.astype(np.int32), lp.astype(np.float32)


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """A tiny student (saved with the demo tokenizer) and a dataset built from its own distribution."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.demo.build import train_tokenizer

    root = tmp_path_factory.mktemp("known")
    student_dir, dataset_dir = root / "student", root / "dataset"
    tok = train_tokenizer(student_dir, seed=0)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        initializer_range=0.5,  # logits spread out: no near-ties for argmax to flip on float noise
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(student_dir)

    rng = np.random.default_rng(0)
    prompts = demo_task.make_prompts(N_PROMPTS, seed=5)
    prompt_ids = [stable_id("known", i) for i in range(N_PROMPTS)]
    prompt_tokens = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    words = [i for i in range(len(tok)) if i not in tok.all_special_ids]
    gens, texts, position, known_modes = [], [], 0, []
    for pid, toks in zip(prompt_ids, prompt_tokens):
        per_prompt, per_texts = [], []
        for _ in range(N_SAMPLES):
            completion = rng.choice(words, size=int(rng.integers(2, 6))).astype(np.int32)
            if position % 3 == 0:  # ended by EOS, which the text (and the checker) leave out
                completion = np.append(completion, np.int32(tok.eos_token_id))
            logq = _log_softmax(_full_logits(model, toks + completion.tolist()))[len(toks) - 1 : -1]
            modes = [MODES[(position + t) % len(MODES)] for t in range(len(logq))]
            ids, lps = zip(*(_teacher_topk(row, mode) for row, mode in zip(logq, modes)))
            position += 1
            known_modes.append((pid, modes))
            ids, lps = np.stack(ids), np.stack(lps)
            hit = ids == completion[:, None]
            token_lp = np.where(hit.any(1), np.where(hit, lps, 0).sum(1), np.log(1e-3)).astype(np.float32)
            per_prompt.append(Generation(completion, token_lp, ids, lps, "length"))
            per_texts.append(tok.decode(completion.tolist(), skip_special_tokens=True))
        gens.append(per_prompt)
        texts.append(per_texts)

    manifest = tiny_manifest(
        k=K,
        vocab=len(tok),
        sampling={"temperature": 0, "max_new_tokens": MAX_NEW, "n": N_SAMPLES},
        num_prompts=N_PROMPTS,
        shard_size=N_PROMPTS // 2,
        num_shards=2,
        heldout_fraction=HELDOUT,
    )
    dataset_dir.mkdir()
    write_manifest(dataset_dir, manifest)
    for s, lo in enumerate(range(0, N_PROMPTS, N_PROMPTS // 2)):
        sl = slice(lo, lo + N_PROMPTS // 2)
        table = build_table(
            prompt_ids=prompt_ids[sl],
            prompts=prompts[sl],
            prompt_token_ids=prompt_tokens[sl],
            generations=gens[sl],
            completions=texts[sl],
            seed=0,
        )
        info = write_shard(dataset_dir, s, table, prompts=N_PROMPTS // 2, heldout_fraction=HELDOUT)
        commit_shard(dataset_dir, manifest, info)
    held = [i for i in range(N_PROMPTS) if _heldout(prompt_ids[i])]
    assert 4 <= len(held) <= N_PROMPTS - 2  # both splits have prompts (training rows must be left out), over 3 held
    return {
        "student": student_dir,
        "dataset": dataset_dir,
        "model": model,
        "tok": tok,
        "modes": known_modes,
        "held": len(held),
    }


def _rows(dataset_dir, max_prompts: int) -> list[dict]:
    """The held-out rows of the first `max_prompts` held-out prompts, in file order, straight from Parquet."""
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    rows = [r for s in manifest["shards"] for r in pq.read_table(dataset_dir / s["file"]).to_pylist()]
    rows = [r for r in rows if _heldout(r["prompt_id"])]
    first = list(dict.fromkeys(r["prompt_id"] for r in rows))[:max_prompts]
    return [r for r in rows if r["prompt_id"] in first]


def expected_metrics(known, max_prompts: int, greedy_prompts: set[str], teacher_prompts: set[str]) -> dict:
    """metrics.json's numbers, computed with NumPy from the Parquet rows and the student's unpadded logits."""
    model, rows = known["model"], _rows(known["dataset"], max_prompts)
    kl, agree, ce, mass, entropy = [], [], [], [], []
    t_ce, t_log_mass = [], []
    for r in rows:
        prompt, completion = list(r["prompt_token_ids"]), list(r["completion_token_ids"])
        logits = _full_logits(model, prompt + completion)[len(prompt) - 1 : -1]
        logq = _log_softmax(logits)
        ids = np.asarray(r["topk_token_ids"], np.int64)
        lp = np.asarray(r["topk_logprobs"], np.float64)
        for t in range(len(completion)):
            ok = np.isfinite(lp[t])
            p = np.exp(lp[t][ok] - np.log(np.exp(lp[t][ok]).sum()))  # the teacher renormalised over its entries
            kl.append(float((p * (np.log(p) - logq[t, ids[t][ok]])).sum()))
            agree.append(float(np.argmax(logits[t]) == ids[t, 0]))
            ce.append(-logq[t, completion[t]])
            mass.append(float(np.exp(logq[t, ids[t][ok]]).sum()))
            raw = np.exp(lp[t][ok])
            tail = max(1.0 - raw.sum(), 0.0)
            entropy.append(float(-(raw * np.log(raw)).sum() - (tail * math.log(tail) if tail > 0 else 0.0)))
            t_log_mass.append(math.log(raw.sum()))
        t_ce.extend(-np.asarray(r["token_logprobs"], np.float64))
    kl, entropy = np.array(kl), np.array(entropy)
    assert np.abs(entropy - 0.3).min() > 1e-3  # no position sits on the threshold
    unc = entropy > 0.3
    assert 0 < unc.sum() < len(unc)  # both kinds of positions are there
    firsts = {}
    for r in rows:
        firsts.setdefault(r["prompt_id"], r)
    greedy_ok = [pid in greedy_prompts for pid in firsts]
    student = {
        "kl": kl.mean(),
        "kl_uncertain": kl[unc].mean(),
        "kl_deterministic": kl[~unc].mean(),
        "top1_agreement": np.mean(agree),
        "ce": np.mean(ce),
        "perplexity": math.exp(np.mean(ce)),
        "topk_mass": np.mean(mass),
        "positions": len(kl),
        "uncertain_positions": int(unc.sum()),
        "accuracy": np.mean(greedy_ok),  # the teacher sampled at temperature 0: the student is sampled greedily too
        "greedy_accuracy": np.mean(greedy_ok),
    }
    teacher = {
        "ce": np.mean(t_ce),
        "perplexity": math.exp(np.mean(t_ce)),
        "kl": -np.mean(t_log_mass),
        "top1_agreement": 1.0,
        "topk_mass": np.mean(np.exp(t_log_mass)),
        "accuracy": np.mean([pid in teacher_prompts for pid in firsts]),
    }
    return {"heldout_prompts": len(firsts), "heldout_samples": len(rows), "teacher": teacher, "student": student}


def greedy_text(model, tok, prompt_tokens: list[int]) -> str:
    """The student's greedy completion, one token at a time without a cache, stopping at EOS."""
    seq = list(prompt_tokens)
    for _ in range(MAX_NEW):
        nxt = int(np.argmax(_full_logits(model, seq)[-1]))
        if nxt == tok.eos_token_id:
            break
        seq.append(nxt)
    return tok.decode(seq[len(prompt_tokens) :], skip_special_tokens=True)


def _install_checker(known, monkeypatch, max_prompts: int) -> tuple[set[str], set[str]]:
    """The demo checker replaced by one that accepts the teacher's first sample for every third held-out prompt and
    the student's greedy completion for every other one; returns (teacher's, student's) accepted prompt ids."""
    rows = _rows(known["dataset"], max_prompts)
    firsts = {}
    for r in rows:
        firsts.setdefault(r["prompt_id"], r)
    accept, teacher_ok, greedy_ok = {}, set(), set()
    for i, (pid, r) in enumerate(firsts.items()):
        if i % 3 == 0:
            accept[r["prompt"]] = r["completion"]
            teacher_ok.add(pid)
        elif i % 2 == 1:
            accept[r["prompt"]] = greedy_text(known["model"], known["tok"], list(r["prompt_token_ids"]))
            greedy_ok.add(pid)
    assert teacher_ok and greedy_ok and len(teacher_ok | greedy_ok) < len(firsts)
    monkeypatch.setattr(
        demo_task, "check", lambda prompt, completion: prompt in accept and accept[prompt] == completion
    )
    return teacher_ok, greedy_ok


def _config(known, tmp_path, **eval_cfg) -> RunConfig:
    return RunConfig.model_validate(
        {
            "output_dir": str(tmp_path / "runs" / "new" / "run"),  # metrics.json creates its directories
            "teacher": {"model": "unused"},
            "prompts": {"path": "unused"},
            "student": {"model": str(known["student"])},
            "train": {"device": "cpu", "loss_chunk_size": 5},
            "eval": {"task": "demo", "batch_size": 3, **eval_cfg},
        }
    )


def _assert_close(got: dict, want: dict, where: str) -> None:
    assert set(want) <= set(got), f"{where}: missing {set(want) - set(got)}"
    for name, value in want.items():
        if isinstance(value, int):
            assert got[name] == value, f"{where}.{name}"
        else:
            assert got[name] == pytest.approx(value, rel=2e-5, abs=1e-6), f"{where}.{name}"


@pytest.mark.parametrize("max_prompts", [2000, 3], ids=["all-heldout", "first-3-prompts"])
def test_every_metric_equals_an_independent_computation(known, tmp_path, monkeypatch, max_prompts):
    teacher_ok, greedy_ok = _install_checker(known, monkeypatch, max_prompts)
    cfg = _config(known, tmp_path, max_prompts=max_prompts)
    metrics = evaluate(cfg, dataset_dir=known["dataset"], student_dir=known["student"])
    want = expected_metrics(known, max_prompts, greedy_ok, teacher_ok)
    _assert_close(metrics["student"], want["student"], "student")
    _assert_close(metrics["teacher"], want["teacher"], "teacher")
    assert set(metrics["student"]) == set(want["student"]) and set(metrics["teacher"]) == set(want["teacher"])
    assert metrics["heldout_prompts"] == want["heldout_prompts"] == min(max_prompts, known["held"])
    assert metrics["heldout_samples"] == want["heldout_samples"] == N_SAMPLES * want["heldout_prompts"]
    params = sum(p.numel() for p in known["model"].state_dict().values())
    assert metrics["student_params"] == params
    assert metrics["split"] == "heldout" and metrics["uncertain_threshold_nats"] == 0.3
    assert metrics["dataset"] == str(known["dataset"]) and metrics["student_dir"] == str(known["student"])
    assert 0 < metrics["seconds"] < 600
    # written twice, both exactly what was returned
    assert json.loads(cfg.metrics_path.read_text()) == metrics
    assert json.loads((known["student"] / "metrics.json").read_text()) == metrics


def test_known_cases_give_their_known_values(known, tmp_path, monkeypatch):
    """Anchors under the NumPy reference: the student picks the teacher's first token except where the top-2 were
    swapped, so agreement is the share of held-out positions not built as `second`; the teacher agrees with itself."""
    _install_checker(known, monkeypatch, 2000)
    m = evaluate(_config(known, tmp_path), dataset_dir=known["dataset"], student_dir=known["student"])
    held = [mode for pid, modes in known["modes"] for mode in modes if _heldout(pid)]
    assert m["student"]["positions"] == len(held)
    assert 0 < held.count("second") < len(held)
    assert m["student"]["top1_agreement"] == pytest.approx(1 - held.count("second") / len(held), abs=1e-12)
    assert m["teacher"]["top1_agreement"] == 1.0
    # teacher_forced (what bench/quality.py calls) gives the same numbers over the same batches
    from pipeline.evaluate import heldout_batches, teacher_forced

    batches = heldout_batches(known["dataset"], batch_size=3, pad_id=known["tok"].pad_token_id, max_prompts=2000)
    alone = teacher_forced(known["model"], (b for b, _ in batches), torch.device("cpu"), chunk_size=5)
    assert alone == pytest.approx({k: v for k, v in m["student"].items() if "accuracy" not in k}, rel=1e-6)


def test_no_task_no_accuracy(known, tmp_path):
    m = evaluate(_config(known, tmp_path, task="none"), dataset_dir=known["dataset"], student_dir=known["student"])
    assert "accuracy" not in m["teacher"] and "accuracy" not in m["student"] and "greedy_accuracy" not in m["student"]


def sampled_texts(model, tok, prompts: list[list[int]], *, temperature: float, seed: int, batch_size: int) -> list[str]:
    """The student's completions sampled at `temperature` from the full softmax (no top-k or top-p cut), written
    out: one seed for the whole pass, prompts in batches of `batch_size`, one draw per row and step for every row
    until all rows have ended, as transformers' sampling loop consumes the generator."""
    torch.manual_seed(seed)
    out = []
    for lo in range(0, len(prompts), batch_size):
        seqs = [list(p) for p in prompts[lo : lo + batch_size]]
        done = [False] * len(seqs)
        new: list[list[int]] = [[] for _ in seqs]
        for _ in range(MAX_NEW):
            logits = torch.from_numpy(np.stack([_full_logits(model, s + n)[-1] for s, n in zip(seqs, new)])).float()
            draws = torch.multinomial(torch.softmax(logits / temperature, -1), num_samples=1)[:, 0].tolist()
            for i, token in enumerate(draws):
                if not done[i]:
                    done[i] = token == tok.eos_token_id
                    new[i].append(token)
            if all(done):
                break
        out += [tok.decode(n, skip_special_tokens=True) for n in new]
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampled_accuracy_samples_the_full_distribution_at_the_datasets_temperature(
    known, tmp_path, monkeypatch, temperature
):
    """With the teacher's data sampled at T, the student is sampled at T, seeded by eval.seed: a checker that
    accepts the completions drawn by hand for half of the prompts gives exactly one half."""
    import shutil

    dataset = shutil.copytree(known["dataset"], tmp_path / "t1")
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["sampling"]["temperature"] = temperature
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    firsts = list({r["prompt_id"]: r for r in reversed(_rows(dataset, 2000))}.values())[::-1]
    hand = lambda t: sampled_texts(  # noqa: E731
        known["model"], known["tok"], [r["prompt_token_ids"] for r in firsts], temperature=t, seed=7, batch_size=3
    )
    drawn = hand(temperature)
    greedy = [greedy_text(known["model"], known["tok"], r["prompt_token_ids"]) for r in firsts]
    assert sum(d != g for d, g in zip(drawn, greedy)) >= len(firsts) // 2  # sampling is not greedy decoding here
    if temperature != 1.0:
        assert sum(d != o for d, o in zip(drawn, hand(1.0))) >= len(firsts) // 4  # and T matters
    accept = {r["prompt"]: text for i, (r, text) in enumerate(zip(firsts, drawn)) if i % 2 == 0}
    monkeypatch.setattr(
        demo_task, "check", lambda prompt, completion: prompt in accept and accept[prompt] == completion
    )
    m = evaluate(_config(known, tmp_path, seed=7), dataset_dir=dataset, student_dir=known["student"])
    assert m["student"]["accuracy"] == pytest.approx(len(accept) / len(firsts))
    want_greedy = sum(accept.get(r["prompt"]) == g for r, g in zip(firsts, greedy)) / len(firsts)
    assert m["student"]["greedy_accuracy"] == pytest.approx(want_greedy)


def test_a_split_with_no_positions_of_a_kind_reports_none():
    """kl_uncertain / kl_deterministic are None (null in metrics.json) when no position falls on that side."""
    from pipeline.evaluate import summarize_positions

    kl = torch.tensor([0.5, 0.25])
    part = {"kl": kl, "agree": torch.tensor([True, False]), "ce": torch.tensor([1.0, 2.0]), "mass": kl}
    low = summarize_positions([{**part, "entropy": torch.tensor([0.1, 0.2])}])
    assert low["kl_uncertain"] is None and low["kl_deterministic"] == pytest.approx(0.375)
    assert low["uncertain_positions"] == 0 and low["positions"] == 2 and low["top1_agreement"] == 0.5
    high = summarize_positions([{**part, "entropy": torch.tensor([0.4, 0.9])}])
    assert high["kl_deterministic"] is None and high["kl_uncertain"] == pytest.approx(0.375)


def test_a_dataset_without_held_out_prompts_is_refused(known, tmp_path):
    """Evaluating on training prompts would flatter the student: one line saying what to do instead."""
    import shutil

    from pipeline.dataset.schema import DatasetError

    dataset = shutil.copytree(known["dataset"], tmp_path / "no-heldout")
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["heldout_fraction"] = 0.0
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    want = (
        f"{dataset} has no held-out prompts (prompts.heldout_fraction was 0); evaluation on training prompts would "
        "not be honest: regenerate with heldout_fraction > 0"
    )
    with pytest.raises(DatasetError) as err:
        evaluate(_config(known, tmp_path), dataset_dir=dataset, student_dir=known["student"])
    assert str(err.value) == want
    assert not _config(known, tmp_path).metrics_path.exists()


def test_prompts_of_different_lengths_in_one_batch_decode_as_they_would_alone(known):
    """Batched generation pads prompts on the left: with the attention mask the pads change nothing, so a checker
    that accepts each prompt's unbatched greedy completion accepts every one of them."""
    from pipeline.evaluate import sample_accuracy

    firsts = list({r["prompt_id"]: r for r in reversed(_rows(known["dataset"], 2000))}.values())[::-1]
    tokens = [list(r["prompt_token_ids"])[i % 3 * 2 :] for i, r in enumerate(firsts)]  # 0, 2 or 4 tokens cut
    assert len({len(t) for t in tokens[:3]}) == 3
    names = [f"prompt {i}" for i in range(len(tokens))]
    want = {n: greedy_text(known["model"], known["tok"], t) for n, t in zip(names, tokens)}
    kw = {"temperature": 0.0, "max_new_tokens": MAX_NEW, "batch_size": 3, "seed": 0, "device": torch.device("cpu")}
    check = lambda prompt, completion: want[prompt] == completion  # noqa: E731
    assert sample_accuracy(known["model"], known["tok"], names, tokens, check, **kw) == 1.0
    assert sample_accuracy(known["model"], known["tok"], names[:1], tokens[:1], check, **kw) == 1.0  # one prompt
