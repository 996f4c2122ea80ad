"""The Prefect flow end to end on tiny models (Prefect's local ephemeral API), and student-only reruns."""

import json
from pathlib import Path

import pytest

from flows.distill import distill_flow
from tests.helpers import refuse_teacher

LM_EVAL_TASKS = Path(__file__).resolve().parents[2] / "data" / "lm_eval"
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]  # a Prefect API per module


def _artifacts() -> dict:
    """The newest artifact of each key on the test API."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {a.key: a for a in sorted(client.read_artifacts(limit=100), key=lambda a: a.created)}


def test_flow_end_to_end_then_student_only_reruns(make_config, tmp_path, monkeypatch):
    cfg = make_config(out=tmp_path / "run")
    out = distill_flow(cfg)
    assert out.generate.samples == 96 and not out.generate.cached
    assert out.train.steps == 6
    metrics = json.loads(cfg.metrics_path.read_text())
    assert metrics["student"]["kl"] > 0 and "accuracy" in metrics["teacher"]
    assert (cfg.student_dir / "model.safetensors").is_file() and (cfg.dataset_dir / "manifest.json").is_file()
    arts = _artifacts()
    inspect_rows = {(r["group"], r["metric"]): r["value"] for r in json.loads(arts["dataset-inspect"].data)}
    assert inspect_rows[("dataset", "samples")] == "96"
    curve = json.loads(arts["training-curve"].data)
    assert [r["step"] for r in curve] == list(range(1, 7)) and all(r["loss"] > 0 for r in curve)
    assert (
        arts["loss-curves"].data.startswith("[")
        and str((cfg.student_dir / "loss_curves.png").resolve()) in arts["loss-curves"].data
    )
    assert {"training-metrics", "evaluation", "dataset-summary", "run-outputs"} <= set(arts)

    refuse_teacher(monkeypatch)  # from here on, starting the teacher fails the test
    first_weights = (cfg.student_dir / "model.safetensors").read_bytes()
    tasks = {"tasks": ["demo_sort"], "include_path": str(LM_EVAL_TASKS), "limit": 8}
    benchmarked = make_config(out=tmp_path / "run", eval={**cfg.eval.model_dump(), "lm_eval": tasks})
    out = distill_flow(benchmarked, stages=["train", "eval"])
    assert out.generate is None and out.train.steps == 6
    scores = json.loads(cfg.metrics_path.read_text())["lm_eval"]
    table = json.loads(_artifacts()["lm-eval"].data)
    assert [(r["task"], r["metric"]) for r in table] == [("demo_sort", "acc"), ("demo_sort", "acc_norm")]
    assert [r["student"] for r in table] == [round(scores["student"]["demo_sort"][m], 5) for m in ("acc", "acc_norm")]
    assert [r["teacher"] for r in table] == [round(scores["teacher"]["demo_sort"][m], 5) for m in ("acc", "acc_norm")]

    # a training-only change, with the live-teacher families: the teacher is loaded in training, never generating
    live = {"live_teacher": True, **{f: {"weight": 0.5} for f in ("feature", "attention", "relation")}}
    changed = make_config(out=tmp_path / "run", train={"max_steps": 4, "lr": 1e-3, **live})
    out = distill_flow(changed)
    assert out.generate.cached, "a training-only change must be a cache hit for the generate task"
    assert out.train.steps == 4
    assert (cfg.student_dir / "model.safetensors").read_bytes() != first_weights
    curve = json.loads(_artifacts()["training-curve"].data)
    assert [r["step"] for r in curve] == [1, 2, 3, 4]
    assert all(r["feature"] > 0 and r["attention"] > 0 and r["relation"] >= 0 for r in curve)
    (final,) = json.loads(_artifacts()["training-metrics"].data)
    assert final["final_feature"] == pytest.approx(curve[-1]["feature"], abs=1e-5)


def test_deleted_dataset_is_regenerated_not_served_from_cache(make_config, tmp_path):
    import shutil

    cfg = make_config(out=tmp_path / "again")
    distill_flow(cfg, stages=["generate"])
    shutil.rmtree(cfg.dataset_dir)
    out = distill_flow(cfg, stages=["generate"])
    assert not out.generate.cached and (cfg.dataset_dir / "manifest.json").is_file()
