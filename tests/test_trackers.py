"""`train.report_to`: the logged steps reach TensorBoard and MLflow (read back from their local stores), and a
tracker whose package is missing is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.helpers import WORDS, one_line_error, tiny_llama, write_config


def _raw(model: Path, tmp_path: Path, report_to: list[str]) -> dict:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{WORDS[i]} {WORDS[i + 1]}"}) + "\n" for i in range(16)))
    return {
        "name": "tracked",
        "output_dir": str(tmp_path / "run"),
        "teacher": {"backend": "hf", "model": str(model), "batch_size": 16},
        "prompts": {"path": str(prompts)},
        "generate": {"k": 4, "max_new_tokens": 5, "shard_size": 16, "seed": 0},
        "student": {"model": str(model)},
        "train": {"max_steps": 3, "batch_size": 8, "warmup_steps": 1, "log_every": 1, "report_to": report_to},
    }


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tracked") / "model", 30, seed=0)


def test_logged_steps_reach_tensorboard_and_mlflow(model, tmp_path) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.config import build_config
    from pipeline.generate import generate_dataset
    from pipeline.train import train_student

    cfg = build_config(_raw(model, tmp_path, ["tensorboard", "mlflow"]))
    generate_dataset(cfg, progress=False)
    result = train_student(cfg, progress=False)
    history = json.loads((Path(result.student_dir) / "train_log.json").read_text())["history"]
    assert [row["step"] for row in history] == [1, 2, 3]
    keys = ("loss", "ce", "kd", "lr", "grad_norm", "tokens_per_s")
    root = Path(cfg.output_dir) / "trackers"

    events = EventAccumulator(str(root / "tensorboard" / "tracked"))
    events.Reload()
    for key in keys:  # TensorBoard stores float32
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [1, 2, 3]
        assert [s.value for s in scalars] == pytest.approx([row[key] for row in history], rel=1e-6)

    client = MlflowClient(tracking_uri=(root / "mlflow").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    for key in keys:
        metrics = client.get_metric_history(run.info.run_id, key)
        assert [(m.step, m.value) for m in metrics] == [(row["step"], pytest.approx(row[key])) for row in history]
    assert run.data.params["lr"] == str(cfg.train.lr)


def test_evaluation_metrics_reach_tensorboard_and_mlflow_at_the_last_trained_step(model, tmp_path) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.config import build_config
    from pipeline.evaluate import evaluate
    from pipeline.generate import generate_dataset
    from pipeline.train import train_student

    raw = _raw(model, tmp_path, ["tensorboard", "mlflow"])
    raw["prompts"]["heldout_fraction"] = 0.25
    cfg = build_config(raw)
    generate_dataset(cfg, progress=False)
    train_student(cfg, progress=False)
    student = evaluate(cfg)["student"]
    names = ("kl", "top1_agreement", "ce", "perplexity", "topk_mass")
    root = Path(cfg.output_dir) / "trackers"

    events = EventAccumulator(str(root / "tensorboard" / "tracked"))
    events.Reload()
    for name in names:
        (scalar,) = events.Scalars(f"eval/{name}")
        assert scalar.step == 3 and scalar.value == pytest.approx(student[name], rel=1e-6)
    assert [s.step for s in events.Scalars("loss")] == [1, 2, 3]  # beside the training curve, not instead of it

    client = MlflowClient(tracking_uri=(root / "mlflow").resolve().as_uri())
    runs = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    (evaluated,) = [r for r in runs if "eval/kl" in r.data.metrics]
    for name in names:
        (metric,) = client.get_metric_history(evaluated.info.run_id, f"eval/{name}")
        assert (metric.step, metric.value) == (3, pytest.approx(student[name]))


def test_a_tracker_without_its_package_is_one_line(model, tmp_path, monkeypatch) -> None:
    from pipeline import trackers
    from pipeline.cli import app

    monkeypatch.setitem(trackers.PACKAGES, "wandb", "distill_no_such_package")
    config = write_config(tmp_path / "run.yaml", _raw(model, tmp_path, ["wandb"]))
    result = CliRunner().invoke(app, ["generate", str(config)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["train", str(config)])
    one_line_error(result, "train.report_to has 'wandb' but the distill_no_such_package package is not installed")
