"""The `distill` Prefect flow: generate -> train -> eval, each a task calling the plain stage function.

Tasks pass paths and hashes, never models or tables. The generate task is cached on the teacher +
prompts + sampling key (`generate_key`), so a rerun that changes only training settings, or
`stages=["train", "eval"]`, never starts the teacher.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipeline.config import RunConfig
from pipeline.dataset.schema import MANIFEST, read_manifest
from pipeline.evaluate import evaluate
from pipeline.generate import generate_dataset, generate_key
from pipeline.train import train_student

STAGES = ("generate", "train", "eval")


def _dataset_complete(cfg: RunConfig) -> bool:
    path = cfg.dataset_dir / MANIFEST
    if not path.is_file():
        return False
    manifest = read_manifest(cfg.dataset_dir)
    return manifest.complete and manifest.generate_fingerprint == generate_key(cfg)


def _retry_on_infrastructure(task, task_run, state) -> bool:
    """Retry crashes and connection trouble, not user errors (bad input fails the same way again)."""
    try:
        state.result()
    except ValueError:
        return False
    except Exception:
        return True
    return False


@task(name="generate", persist_result=True, retries=2, retry_delay_seconds=10, retry_condition_fn=_retry_on_infrastructure,
      cache_key_fn=lambda ctx, params: f"distill-generate-{params['key']}")
def generate_task(cfg: RunConfig, key: str) -> dict:
    """Teacher completes the prompts; writes the sharded Parquet dataset (resumes an interrupted one)."""
    result = generate_dataset(cfg)
    manifest = read_manifest(Path(result.dataset_dir))
    create_table_artifact(key="dataset-summary", description=f"dataset {result.dataset_dir}", table=[
        {"samples": manifest.total_samples, "tokens": manifest.total_tokens, "shards": len(manifest.shards),
         "k": manifest.k, "teacher": manifest.teacher.model, "backend": manifest.teacher.backend,
         "temperature": manifest.sampling.temperature, "seconds": round(result.seconds, 1)}])
    return asdict(result)


@task(name="train")
def train_task(cfg: RunConfig, dataset_dir: str) -> dict:
    """Student trains on the dataset's training split."""
    result = train_student(cfg, dataset_dir=Path(dataset_dir))
    create_table_artifact(key="training-metrics", description=f"student {result.student_dir}",
                          table=[{k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(result).items()}])
    return asdict(result)


@task(name="eval")
def eval_task(cfg: RunConfig, dataset_dir: str, student_dir: str) -> dict:
    """Student vs teacher on held-out prompts."""
    metrics = evaluate(cfg, dataset_dir=Path(dataset_dir), student_dir=Path(student_dir))
    rows = [{"model": who, **{k: round(v, 5) if isinstance(v, float) else v for k, v in metrics[who].items()}}
            for who in ("teacher", "student")]
    create_table_artifact(key="evaluation", table=rows, description="held-out evaluation")
    return metrics


@flow(name="distill", log_prints=True)
def distill_flow(cfg: RunConfig, stages: list[str] = list(STAGES)) -> dict:
    """Run the requested stages of one distillation run; returns per-stage results and timings."""
    logger = get_run_logger()
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; choose from {', '.join(STAGES)}")
    out: dict = {"stages": list(stages), "seconds": {}}
    dataset_dir, student_dir = str(cfg.dataset_dir), str(cfg.student_dir)
    if "generate" in stages:
        t0 = time.perf_counter()
        refresh = not _dataset_complete(cfg)  # a cached key must not stand for a dataset that is gone
        state = generate_task.with_options(refresh_cache=refresh)(cfg, generate_key(cfg), return_state=True)
        out["generate"] = {**state.result(), "cached": state.is_completed() and state.name == "Cached"}
        out["seconds"]["generate"] = time.perf_counter() - t0
        # a cache hit may come from another run with the same key but another output_dir: use ours
        out["generate"]["dataset_dir"] = dataset_dir
    if "train" in stages:
        t0 = time.perf_counter()
        out["train"] = train_task(cfg, dataset_dir)
        out["seconds"]["train"] = time.perf_counter() - t0
        student_dir = out["train"]["student_dir"]
    if "eval" in stages:
        t0 = time.perf_counter()
        out["eval"] = eval_task(cfg, dataset_dir, student_dir)
        out["seconds"]["eval"] = time.perf_counter() - t0
    paths = {"dataset": dataset_dir, "student": student_dir, "metrics": str(cfg.metrics_path)}
    create_markdown_artifact(key="run-outputs", markdown="\n".join(f"- **{k}**: `{v}`" for k, v in paths.items()))
    out["paths"] = paths
    logger.info("distill run %s finished: %s", cfg.name, out["seconds"])
    return out
