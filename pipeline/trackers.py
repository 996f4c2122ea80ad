"""Experiment trackers (`train.report_to`): accelerate's TensorBoard, MLflow and W&B trackers, writing locally.

Everything goes under `<output_dir>/trackers/`: TensorBoard event files in `tensorboard/<name>/`, an MLflow file
store in `mlflow/` (unless MLFLOW_TRACKING_URI says otherwise), W&B offline runs in `wandb/` (unless WANDB_MODE
says otherwise). The run's tracker name (TensorBoard run, MLflow experiment, W&B project) is the config's `name`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from pipeline.config import ConfigError, RunConfig

TRACKERS_DIR = "trackers"
USER_MLFLOW_URI = os.environ.get("MLFLOW_TRACKING_URI")
"""The user's MLflow server, read once at import: `mlflow.set_tracking_uri` writes that variable itself, so reading
it later would send a second run in the same process into the first run's store."""
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
"""The package each tracker needs (`pip install -e ".[trackers]"` has the first two)."""


def tracker_root(cfg: RunConfig) -> Path:
    return Path(cfg.output_dir) / TRACKERS_DIR


def check_trackers(cfg: RunConfig) -> None:
    """One line for a tracker whose package is not installed (before anything runs)."""
    for name in cfg.train.report_to:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(
                f"train.report_to has {name!r} but the {PACKAGES[name]} package is not installed: "
                f'pip install {PACKAGES[name]} (tensorboard and mlflow: pip install -e ".[trackers]"), or drop it'
            )


def accelerator_kwargs(cfg: RunConfig) -> dict:
    """`log_with` and `project_config` for accelerate's Accelerator; empty without `train.report_to`."""
    if not cfg.train.report_to:
        return {}
    from accelerate.utils import ProjectConfiguration

    check_trackers(cfg)
    root = tracker_root(cfg).resolve()
    return {
        "log_with": list(dict.fromkeys(cfg.train.report_to)),
        "project_config": ProjectConfiguration(project_dir=str(root), logging_dir=str(root / "tensorboard")),
    }


def start_trackers(accelerator, cfg: RunConfig) -> None:
    """Start the run's trackers (main process) with the training settings as hyperparameters."""
    report_to = cfg.train.report_to
    if not report_to or not accelerator.is_main_process:
        return
    root = tracker_root(cfg).resolve()
    root.mkdir(parents=True, exist_ok=True)
    init_kwargs: dict[str, dict] = {}
    if "mlflow" in report_to and not USER_MLFLOW_URI:
        import mlflow

        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
        mlflow.set_tracking_uri((root / "mlflow").as_uri())
    if "wandb" in report_to:
        os.environ.setdefault("WANDB_MODE", "offline")
        init_kwargs["wandb"] = {"dir": str(root), "name": cfg.name}
    hparams = {k: v for k, v in cfg.train.model_dump().items() if isinstance(v, (bool, int, float, str))}
    accelerator.init_trackers(cfg.name, config=hparams, init_kwargs=init_kwargs)


def log_row(accelerator, cfg: RunConfig, row: dict) -> None:
    """One logged step of the history (every numeric part but the step itself) to the trackers."""
    if cfg.train.report_to:
        values = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        accelerator.log(values, step=int(row["step"]))


def end_trackers(accelerator, cfg: RunConfig) -> None:
    """Flush and close the trackers. Not `accelerator.end_training()`: it also destroys the process group, which
    saving the student still needs under DDP/FSDP."""
    if cfg.train.report_to:
        for tracker in accelerator.trackers:
            tracker.finish()
        accelerator.trackers = []


def eval_values(metrics: dict) -> dict[str, float]:
    """The student's numbers in metrics.json as tracker scalars: `eval/<metric>` and `lm_eval/<task>/<metric>`."""
    plain = lambda v: isinstance(v, int | float) and not isinstance(v, bool)
    values = {f"eval/{k}": float(v) for k, v in metrics["student"].items() if plain(v)}
    for task, scores in ((metrics.get("lm_eval") or {}).get("student") or {}).items():
        values.update({f"lm_eval/{task}/{k}": float(v) for k, v in scores.items() if plain(v)})
    return values


def log_eval(cfg: RunConfig, metrics: dict, step: int) -> None:
    """An evaluation's student metrics to the run's trackers at `step` (where its training ended). TensorBoard
    puts them beside the training curves; MLflow and W&B record them as a run of their own under the same name."""
    if not cfg.train.report_to:
        return
    from accelerate import Accelerator

    accelerator = Accelerator(**accelerator_kwargs(cfg))
    start_trackers(accelerator, cfg)
    if accelerator.is_main_process:
        accelerator.log(eval_values(metrics), step=step)
    end_trackers(accelerator, cfg)
