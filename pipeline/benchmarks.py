"""Standard benchmarks for the student: lm-evaluation-harness tasks scored on the student and the teacher.

The harness loads each model with its own transformers backend (`from_pretrained` on the directory or hub id), so a
hub task (`hellaswag`, `arc_easy`, ...) works wherever its dataset is reachable, and a task defined in a local folder
of YAMLs (`include_path`) works offline. The teacher's scores are cached per teacher and task settings: rerunning
only the student does not score the teacher again.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from pipeline.config import LMEvalConfig, RunConfig
from pipeline.core import UserError, path_fingerprint, stable_id

log = logging.getLogger(__name__)


class BenchmarkError(UserError):
    """lm-evaluation-harness missing, or a task it does not know, stated in one line."""


def _harness():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise BenchmarkError(
            "eval.lm_eval needs lm-evaluation-harness: pip install -e '.[lmeval]' (or pip install 'lm-eval[hf]')"
        ) from None
    return lm_eval, TaskManager


def task_manager(cfg: LMEvalConfig):
    """The harness's task registry plus `include_path`; unknown task names are one line, before any model loads."""
    _, TaskManager = _harness()
    if cfg.include_path and not Path(cfg.include_path).is_dir():
        raise BenchmarkError(f"eval.lm_eval.include_path {cfg.include_path!r} is not a directory of task YAMLs")
    manager = None
    if cfg.include_path:  # indexing the harness's own ~15k task YAMLs takes seconds: only when a task is not local
        manager = TaskManager(include_path=cfg.include_path, include_defaults=False)
        if not set(cfg.tasks) <= set(manager.all_tasks):
            manager = None
    manager = manager or TaskManager(include_path=cfg.include_path)
    unknown = [t for t in cfg.tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in {cfg.include_path}" if cfg.include_path else " (set eval.lm_eval.include_path for local tasks)"
        raise BenchmarkError(f"eval.lm_eval.tasks: {', '.join(map(repr, unknown))} not found in lm-eval's tasks{where}")
    return manager


def _flatten(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from the harness's `results` ("acc,none" -> "acc"; another filter -> "metric/filter")."""
    out = {}
    for task, values in results.items():
        row = {}
        for key, value in values.items():
            if "," not in key or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            metric, filt = key.split(",", 1)
            if isinstance(value, float) and not math.isfinite(value):
                continue
            row[metric if filt == "none" else f"{metric}/{filt}"] = float(value)
        out[task] = row
    return out


def score(
    model: str, cfg: LMEvalConfig, *, device: str, revision: str | None = None, seed: int = 0, manager=None
) -> dict:
    """Run the configured tasks on one model (a directory or hub id): {task: {metric: value}}."""
    lm_eval, _ = _harness()
    model_args = {"pretrained": model, "dtype": "float32" if device == "cpu" else "bfloat16", "device": device}
    if revision:
        model_args["revision"] = revision
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=list(cfg.tasks),
        num_fewshot=cfg.num_fewshot,
        limit=cfg.limit,
        batch_size=cfg.batch_size,
        task_manager=manager or task_manager(cfg),
        apply_chat_template=cfg.chat_template,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    return _flatten(out["results"])


def teacher_key(cfg: RunConfig) -> str:
    """What the teacher's scores depend on: the teacher (content of a local one), the task settings and the local
    task folder's content, the harness version."""
    import lm_eval

    t, b = cfg.teacher, cfg.eval.lm_eval
    folder = path_fingerprint(b.include_path) if b.include_path else ""
    settings = b.model_dump(exclude={"teacher", "batch_size"})
    return stable_id(t.model, t.revision, path_fingerprint(t.model), json.dumps(settings), folder, lm_eval.__version__)


def compare(cfg: RunConfig, student_dir: Path, device: str, manager=None) -> dict:
    """metrics.json's "lm_eval": the task settings, and each task's scores for the student and the teacher."""
    b = cfg.eval.lm_eval
    manager = manager or task_manager(b)  # unknown tasks fail before either model loads
    student = score(str(student_dir), b, device=device, seed=cfg.eval.seed, manager=manager)
    teacher = None
    if b.teacher:
        cache = Path(cfg.output_dir) / "lm_eval" / f"teacher-{teacher_key(cfg)}.json"
        if cache.is_file():
            teacher = json.loads(cache.read_text())
            log.info("lm-eval: teacher scores from %s", cache)
        else:
            teacher = score(
                cfg.teacher.model, b, device=device, revision=cfg.teacher.revision, seed=cfg.eval.seed, manager=manager
            )
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(teacher, indent=2))
            tmp.replace(cache)
    return {"settings": b.model_dump(), "student": student, "teacher": teacher}


def rows(lm_eval_metrics: dict) -> list[dict]:
    """One row per task and metric: teacher and student side by side (stderr columns beside their metric)."""
    student, teacher = lm_eval_metrics["student"], lm_eval_metrics.get("teacher") or {}
    out = []
    for task, metrics in student.items():
        for metric, value in metrics.items():
            if metric.endswith("_stderr") or "_stderr/" in metric:
                continue
            err = metric.replace("/", "_stderr/", 1) if "/" in metric else f"{metric}_stderr"
            out.append(
                {
                    "task": task,
                    "metric": metric,
                    "teacher": teacher.get(task, {}).get(metric),
                    "student": value,
                    "student_stderr": metrics.get(err),
                }
            )
    return out
