"""`eval.lm_eval` (issue #19): lm-evaluation-harness tasks on the student and the teacher, side by side in
metrics.json. Offline, through the demo's two local tasks (data/lm_eval: task YAMLs over a shipped JSONL), with each
score recomputed here from the models' own forward passes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.benchmarks import BenchmarkError, rows, task_manager
from pipeline.config import LMEvalConfig
from pipeline.demo.task import check, write_benchmark_jsonl
from pipeline.evaluate import evaluate
from pipeline.models import build_student, load_causal_lm, load_tokenizer

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the `lmeval` extra (make install has it)")

TASKS = Path(__file__).resolve().parents[1] / "data" / "lm_eval"
LIMIT = 24


def _docs() -> list[dict]:
    lines = (TASKS / "demo_sort.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:LIMIT]]


@torch.no_grad()
def _by_hand(model_dir: Path) -> dict[str, dict[str, float]]:
    """Both tasks' accuracies from plain forward passes: the choice with the highest summed log-likelihood (and per
    character, acc_norm), and greedy completions checked by the demo task's checker."""
    tok, model = load_tokenizer(str(model_dir)), load_causal_lm(str(model_dir), device="cpu")
    acc, acc_norm, answered = [], [], []
    for doc in _docs():
        context = tok(doc["context"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in doc["choices"]:
            cont = tok(doc["context"] + choice, add_special_tokens=False)["input_ids"][len(context) :]
            logp = model(torch.tensor([context + cont])).logits[0, len(context) - 1 : -1].log_softmax(-1)
            scores.append(float(logp[torch.arange(len(cont)), torch.tensor(cont)].sum()))
        acc.append(int(np.argmax(scores)) == doc["label"])
        acc_norm.append(int(np.argmax([s / len(c) for s, c in zip(scores, doc["choices"])])) == doc["label"])
        ids = torch.tensor([tok(doc["prompt"], add_special_tokens=False)["input_ids"]])
        out = model.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]
        answered.append(check(doc["prompt"], text))
    return {
        "demo_sort": {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm))},
        "demo_answer": {"acc": float(np.mean(answered))},
    }


@pytest.fixture(scope="module")
def random_student(tiny_teacher, tmp_path_factory) -> Path:
    """An untrained student of the teacher's family (its tokenizer beside it): a score well below the teacher's."""
    from pipeline.config import ShrinkConfig, StudentConfig

    out = tmp_path_factory.mktemp("student")
    student = build_student(StudentConfig(shrink=ShrinkConfig(num_hidden_layers=1)), str(tiny_teacher), seed=0)
    student.save_pretrained(out)
    load_tokenizer(str(tiny_teacher)).save_pretrained(out)
    return out


def test_shipped_rows_are_what_the_generator_writes(tmp_path):
    """data/lm_eval/demo_sort.jsonl is `write_benchmark_jsonl(…, 200, 2_000_003)`: regenerated, byte for byte."""
    assert (
        write_benchmark_jsonl(tmp_path / "d.jsonl", 200, 2_000_003).read_bytes()
        == (TASKS / "demo_sort.jsonl").read_bytes()
    )


def _with_tasks(make_config, **settings):
    tasks = {"tasks": ["demo_sort", "demo_answer"], "include_path": str(TASKS), "limit": LIMIT, **settings}
    return make_config(eval={"batch_size": 64, "max_prompts": 16, "lm_eval": tasks})


def test_harness_scores_equal_scores_computed_by_hand(generated, tiny_teacher, random_student, make_config):
    cfg = _with_tasks(make_config)
    metrics = evaluate(cfg, dataset_dir=generated.dataset_dir, student_dir=random_student)
    got = metrics["lm_eval"]
    for who, model_dir in (("teacher", tiny_teacher), ("student", random_student)):
        want = _by_hand(model_dir)
        for task, values in want.items():
            for metric, value in values.items():
                assert got[who][task][metric] == pytest.approx(value, abs=1e-9), (who, task, metric)
        assert 0 <= got[who]["demo_sort"]["acc_stderr"] <= 0.11
    assert got["teacher"]["demo_sort"]["acc"] > got["student"]["demo_sort"]["acc"]
    on_disk = json.loads((random_student / "metrics.json").read_text())["lm_eval"]
    assert on_disk == got and on_disk["settings"]["limit"] == LIMIT
    table = {(r["task"], r["metric"]): r for r in rows(got)}
    assert set(table) == {("demo_sort", "acc"), ("demo_sort", "acc_norm"), ("demo_answer", "acc")}
    assert table["demo_sort", "acc"]["teacher"] == got["teacher"]["demo_sort"]["acc"]
    assert table["demo_sort", "acc"]["student_stderr"] == got["student"]["demo_sort"]["acc_stderr"]

    # the teacher is scored once per teacher and task settings: a second run reads its cached scores
    (cache,) = (Path(cfg.output_dir) / "lm_eval").glob("teacher-*.json")
    cache.write_text(json.dumps({"demo_sort": {"acc": 0.125}}))
    again = evaluate(cfg, dataset_dir=generated.dataset_dir, student_dir=random_student)["lm_eval"]
    assert again["teacher"] == {"demo_sort": {"acc": 0.125}} and again["student"] == got["student"]
    cfg = _with_tasks(make_config, limit=LIMIT - 1)  # other settings: another key, scored afresh
    third = evaluate(cfg, dataset_dir=generated.dataset_dir, student_dir=random_student)["lm_eval"]
    assert third["teacher"]["demo_sort"]["acc"] != 0.125
    assert len(list((Path(cfg.output_dir) / "lm_eval").glob("teacher-*.json"))) == 2


def test_unknown_tasks_and_a_missing_task_folder_are_one_line(tmp_path):
    with pytest.raises(BenchmarkError) as err:
        task_manager(LMEvalConfig(tasks=["demo_sort", "no_such_task"], include_path=str(TASKS)))
    assert str(err.value) == (f"eval.lm_eval.tasks: 'no_such_task' not found in lm-eval's tasks or in {TASKS}")
    with pytest.raises(BenchmarkError, match="is not a directory of task YAMLs"):
        task_manager(LMEvalConfig(tasks=["demo_sort"], include_path=str(tmp_path / "missing")))


def test_a_misspelt_task_stops_the_run_in_preflight_before_training(make_config):
    from pipeline.preflight import preflight

    cfg = _with_tasks(make_config, tasks=["demo_sortt"])
    with pytest.raises(BenchmarkError, match="'demo_sortt' not found"):
        preflight(cfg, ["generate", "train", "eval"])
    preflight(cfg, ["generate", "train"])  # no eval stage: not checked


def test_the_demo_tasks_run_from_any_working_directory(tmp_path, monkeypatch):
    """The task's loader finds its JSONL beside the YAML, not relative to where the harness runs."""
    copy = shutil.copytree(TASKS, tmp_path / "tasks")
    monkeypatch.chdir(tmp_path)
    from lm_eval.tasks import get_task_dict

    manager = task_manager(LMEvalConfig(tasks=["demo_sort"], include_path=str(copy)))
    docs = list(get_task_dict(["demo_sort"], manager)["demo_sort"].test_docs())
    assert len(docs) == 200 and docs[0] == json.loads((TASKS / "demo_sort.jsonl").read_text().splitlines()[0])
