"""Teacher, student and tokenizer of different sizes (issue #19): ids beyond the student's vocabulary are folded
into the tail at training, counted, and never an index error; a student smaller than its tokenizer is one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.losses import chunked_distill_loss_sums, distill_loss_sums, out_of_vocab_counts, topk_divergence
from tests.helpers import WORDS, tiny_llama

TOKENIZER_SIZE = len(WORDS) + 3  # 30: 3 specials + 27 words
TEACHER_ROWS, STUDENT_ROWS = 40, 32  # padded embeddings: the teacher's 8 rows beyond the student's


# --- the loss, by hand --------------------------------------------------------------------------------------------

Z = torch.tensor([[1.0, 0.5, -0.5, 0.0, 2.0], [0.0, 1.0, 0.3, -1.0, 0.2]], dtype=torch.float64)  # student, V = 5
IDS = torch.tensor([[4, 7, 1], [6, 5, 9]])  # row 0: id 7 beyond V; row 1: every id beyond V
LPS = torch.tensor([[-0.5, -1.5, -2.5], [-0.3, -1.8, -2.2]], dtype=torch.float64)


def _reference(tail: bool) -> list[float]:
    """Forward KL per row with the beyond-V entries treated as missing, written out with math."""
    logq = [[z - math.log(sum(math.exp(x) for x in row)) for z in row] for row in Z.tolist()]
    out = []
    for r, (ids, lps) in enumerate(zip(IDS.tolist(), LPS.tolist())):
        kept = [(i, lp) for i, lp in zip(ids, lps) if i < 5]
        if tail:
            p = [math.exp(lp) for _, lp in kept] + [1 - sum(math.exp(lp) for _, lp in kept)]
            q = [math.exp(logq[r][i]) for i, _ in kept]
            q = q + [1 - sum(q)]
        else:  # teacher renormalised over what the student can score; student not renormalised
            total = sum(math.exp(lp) for _, lp in kept)
            p = [math.exp(lp) / total for _, lp in kept]
            q = [math.exp(logq[r][i]) for i, _ in kept]
        out.append(sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0))
    return out


@pytest.mark.parametrize("tail", [False, True])
def test_ids_beyond_the_student_vocab_fold_into_the_tail(tail: bool) -> None:
    got = topk_divergence(Z, IDS, LPS, tail_bucket=tail)
    expected = _reference(tail)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    # row 0 keeps ids 4 and 1 (with the tail: p = .6065, .0821, tail .3114; q = .5530, .1234, tail .3236);
    # row 1 has nothing the student can score: 0 without the tail, and with it both tails hold all the mass
    assert got.tolist() == pytest.approx([0.4059 if not tail else 0.0106, 0.0], abs=1e-4)


def test_sampled_tokens_beyond_the_student_vocab_get_no_ce_and_gradients_stay_finite() -> None:
    z = Z.clone().requires_grad_(True)
    labels = torch.tensor([1, 8])  # row 1's sampled token is beyond V
    for alpha in (0.5, 1.0):  # the shared gather (0 < alpha < 1, T = 1) and CE alone
        sums = distill_loss_sums(z, labels, IDS, LPS, alpha=alpha, tail_bucket=True)
        ce_row0 = -torch.log_softmax(Z[0], -1)[1].item()
        assert sums.ce_sum.item() == pytest.approx(ce_row0)
        assert sums.n_tokens == 2  # the position still counts (and keeps its KD term)
        if alpha < 1:
            assert sums.kd_sum.item() == pytest.approx(sum(_reference(True)))
        (grad,) = torch.autograd.grad(sums.ce_sum + sums.kd_sum, z)
        assert torch.isfinite(grad).all()
    # the chunked head gives the same sums (one row per chunk)
    head = torch.nn.Linear(5, 5, bias=False, dtype=torch.float64)
    head.weight.data = torch.eye(5, dtype=torch.float64)
    chunked = chunked_distill_loss_sums(Z, head, labels, IDS, LPS, alpha=0.5, tail_bucket=True, chunk_size=1)
    whole = distill_loss_sums(Z, labels, IDS, LPS, alpha=0.5, tail_bucket=True)
    torch.testing.assert_close(torch.stack([chunked.ce_sum, chunked.kd_sum]), torch.stack([whole.ce_sum, whole.kd_sum]))


def test_out_of_vocab_counts() -> None:
    assert out_of_vocab_counts(IDS, torch.tensor([1, 8]), 5).tolist() == [4, 2, 1]
    assert out_of_vocab_counts(IDS, torch.tensor([1, 8]), 10).tolist() == [0, 0, 0]


# --- a run with real (tiny) checkpoints ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab-models")
    return {
        "teacher": tiny_llama(root / "teacher", TEACHER_ROWS, seed=0),
        "student": tiny_llama(root / "student", STUDENT_ROWS, seed=1),
        "small": tiny_llama(root / "small", TOKENIZER_SIZE - 4, seed=2),
    }


def _raw(models: dict[str, Path], tmp_path: Path, student: str = "student", **train) -> dict:
    prompts = tmp_path / "prompts.jsonl"
    rng = np.random.default_rng(0)
    prompts.write_text("".join(json.dumps({"prompt": " ".join(rng.choice(WORDS, 3))}) + "\n" for _ in range(24)))
    return {
        "name": "vocab",
        "output_dir": str(tmp_path / "run"),
        "teacher": {"backend": "hf", "model": str(models["teacher"]), "batch_size": 24},
        "prompts": {"path": str(prompts), "heldout_fraction": 0.0},
        "generate": {"k": 8, "max_new_tokens": 6, "shard_size": 12, "seed": 0},
        "student": {"model": str(models[student])},
        "train": {"max_steps": 3, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "log_every": 1, **train},
    }


@pytest.fixture(scope="module")
def dataset(models, tmp_path_factory) -> Path:
    """Generated by the hf teacher with 40 rows: its top-k and samples reach ids 30..39 (no tokenizer text)."""
    from pipeline.config import build_config
    from pipeline.generate import generate_dataset

    cfg = build_config(_raw(models, tmp_path_factory.mktemp("vocab-gen")))
    generate_dataset(cfg, progress=False)
    return cfg.dataset_dir


def _beyond(dataset: Path, limit: int) -> list[int]:
    """[top-k entries, positions, sampled tokens] with id >= limit, read straight from Parquet."""
    from tests.helpers import read_rows

    rows = read_rows(dataset)
    ids, sampled = np.concatenate(rows.topk_ids), np.concatenate(rows.completion_tokens)
    return [int((ids >= limit).sum()), int((ids >= limit).any(1).sum()), int((sampled >= limit).sum())]


def test_capture_keeps_padding_row_ids_and_validate_accepts_them(dataset) -> None:
    from pipeline.dataset.schema import read_manifest
    from pipeline.dataset.validate import validate_dataset

    manifest = read_manifest(dataset)
    assert manifest.teacher.vocab_size == TEACHER_ROWS
    assert manifest.teacher.tokenizer_size == TOKENIZER_SIZE
    assert _beyond(dataset, TOKENIZER_SIZE)[0] > 0  # the random teacher does put top-k mass on padding rows
    validate_dataset(dataset)  # ids in [tokenizer size, embedding rows) are valid teacher output


@pytest.mark.parametrize("tail", [True, False])
def test_a_student_with_fewer_rows_than_the_teacher_trains_and_counts_what_it_folded(models, dataset, tmp_path, tail):
    from pipeline.config import build_config
    from pipeline.train import train_student

    cfg = build_config(_raw(models, tmp_path, tail_bucket=tail))
    result = train_student(cfg, dataset_dir=dataset, progress=False)  # 3 steps x 8 = the 24 samples, once
    log = json.loads((Path(result.student_dir) / "train_log.json").read_text())
    entries, positions, sampled = _beyond(dataset, STUDENT_ROWS)
    assert entries > 0 and sampled > 0  # the run really met ids the student cannot score
    assert log["vocab"] == {
        "student_size": STUDENT_ROWS,
        "teacher_size": TEACHER_ROWS,
        "tokenizer_size": TOKENIZER_SIZE,
        "topk_entries_beyond_student": entries,
        "positions_beyond_student": positions,
        "sampled_beyond_student": sampled,
    }
    assert all(math.isfinite(row["loss"]) for row in log["history"])


def test_a_student_smaller_than_its_tokenizer_is_one_line(models, dataset, tmp_path) -> None:
    from pipeline.cli import app
    from tests.helpers import one_line_error, write_config

    config = write_config(tmp_path / "run.yaml", _raw(models, tmp_path, student="small"))
    result = CliRunner().invoke(app, ["train", str(config), "--dataset", str(dataset)])
    line = one_line_error(result, "has 26 embedding rows but its tokenizer has 30 tokens")
    assert "resize_token_embeddings(30)" in line


def test_inspect_counts_ids_beyond_the_tokenizer(dataset) -> None:
    from pipeline.dataset.stats import summarize
    from pipeline.dataset.summary_text import summary_rows

    summary = summarize(dataset)
    entries, _, sampled = _beyond(dataset, TOKENIZER_SIZE)
    assert (summary.topk_beyond_tokenizer, summary.sampled_beyond_tokenizer) == (entries, sampled)
    row = next(r for r in summary_rows(summary) if r["metric"] == "ids beyond the tokenizer")
    assert f"{entries:,} top-k entries" in row["value"]


def test_a_resumed_run_reports_the_counts_of_the_whole_run(models, dataset, tmp_path) -> None:
    from pipeline.config import build_config
    from pipeline.train import train_student

    cfg = build_config(_raw(models, tmp_path, checkpoint_every=2))
    whole = train_student(cfg, dataset_dir=dataset, progress=False)  # leaves the step-2 checkpoint behind
    first = json.loads((Path(whole.student_dir) / "train_log.json").read_text())["vocab"]
    resumed = train_student(cfg, dataset_dir=dataset, progress=False, resume=True)
    assert resumed.resumed_from_step == 2
    assert json.loads((Path(resumed.student_dir) / "train_log.json").read_text())["vocab"] == first
    assert first["topk_entries_beyond_student"] == _beyond(dataset, STUDENT_ROWS)[0]
