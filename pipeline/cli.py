"""`distill` command line: each command calls the same stage function the Prefect flow calls."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Offline knowledge distillation: a teacher writes top-k logprobs to Parquet, a student learns from them.")
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}

ConfigArg = Annotated[Path, typer.Argument(help="YAML run config (see configs/).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a config key: train.lr=1e-3 (repeatable).")]


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _run(fn, *args, **kwargs):
    """Call a stage; known user errors become one line and exit 1 (a traceback only with --debug)."""
    from pipeline.config import ConfigError
    from pipeline.dataset.validate import DatasetInvalid
    from pipeline.generate import DatasetMismatchError
    from pipeline.models import ModelLoadError
    from pipeline.prompts import PromptsError
    from pipeline.teachers.vllm_server import TeacherRequestError, TeacherServerError
    from pipeline.train import TokenizerMismatchError

    user_errors = (ConfigError, PromptsError, ModelLoadError, DatasetInvalid, DatasetMismatchError,
                   TokenizerMismatchError, FileNotFoundError, TeacherServerError, TeacherRequestError, ValueError)
    try:
        return fn(*args, **kwargs)
    except user_errors as err:
        if _state["debug"]:
            raise
        _fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    except KeyboardInterrupt:
        _fail("interrupted; committed shards are kept and the next run resumes from them")


def _config(path: Path, overrides: list[str] | None):
    from pipeline.config import load_config

    return _run(load_config, path, overrides or [])


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False,
         verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False) -> None:
    _state["debug"] = debug
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file weight loading bars drown the stage progress
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def run(config: ConfigArg, stages: Annotated[str, typer.Option(help="Comma-separated: generate,train,eval.")] = "generate,train,eval",
        set_: SetOpt = None) -> None:
    """Run the Prefect flow (ephemeral local API unless PREFECT_API_URL is set)."""
    cfg = _config(config, set_)
    wanted = [s.strip() for s in stages.split(",") if s.strip()]
    from flows.distill import STAGES

    bad = [s for s in wanted if s not in STAGES]
    if bad:
        _fail(f"unknown stage {bad[0]!r}; choose from {', '.join(STAGES)}")
    from pipeline.preflight import preflight

    _run(preflight, cfg, wanted)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pipeline")  # stage logs appear in the Prefect run
    logging.getLogger("pipeline").setLevel(logging.INFO)
    from flows.distill import distill_flow

    out = _run(distill_flow, cfg, stages=wanted)
    print_summary(out)


def print_summary(out: dict) -> None:
    """Stage times, teacher vs student metrics, and where everything was written."""
    table = Table(title="distill run", show_header=True)
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("result")
    gen = out.get("generate")
    if gen:
        note = "cached: teacher not started" if gen["cached"] or not gen["teacher_loaded"] else "teacher ran"
        table.add_row("generate", f"{out['seconds']['generate']:.1f}", f"{gen['samples']} samples, {gen['tokens']} tokens, {note}")
    if out.get("train"):
        t = out["train"]
        table.add_row("train", f"{out['seconds']['train']:.1f}", f"{t['steps']} steps, loss {t['final_loss']:.4f}, {t['tokens_per_s']:.0f} tok/s")
    if out.get("eval"):
        table.add_row("eval", f"{out['seconds']['eval']:.1f}", f"{out['eval']['heldout_prompts']} held-out prompts")
    console.print(table)
    if out.get("eval"):
        print_metrics(out["eval"])
    for name, path in out.get("paths", {}).items():
        console.print(f"  {name:8s} {path}")


def print_metrics(metrics: dict) -> None:
    keys = ["accuracy", "greedy_accuracy", "kl", "kl_uncertain", "kl_deterministic", "top1_agreement", "ce", "perplexity"]
    table = Table(title="held-out: teacher vs student")
    table.add_column("metric")
    table.add_column("teacher", justify="right")
    table.add_column("student", justify="right")
    fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    for key in keys:
        if key in metrics["student"] or key in metrics["teacher"]:
            table.add_row(key, fmt(metrics["teacher"].get(key)), fmt(metrics["student"].get(key)))
    console.print(table)


@app.command()
def generate(config: ConfigArg, set_: SetOpt = None) -> None:
    """Generate stage only: teacher -> Parquet dataset (resumes an interrupted run)."""
    from pipeline.generate import generate_dataset
    from pipeline.preflight import preflight

    cfg = _config(config, set_)
    _run(preflight, cfg, ["generate"])
    res = _run(generate_dataset, cfg)
    state = "teacher ran" if res.teacher_loaded else "already complete, teacher not started"
    console.print(f"dataset {res.dataset_dir}: {res.samples} samples, {res.tokens} tokens ({state}, {res.seconds:.1f}s)")


@app.command()
def train(config: ConfigArg, dataset: Annotated[Optional[Path], typer.Option(help="Dataset dir (default: output_dir/dataset).")] = None,
          resume: Annotated[bool, typer.Option(help="Continue from the newest good checkpoint in <student>/checkpoints.")] = False,
          set_: SetOpt = None) -> None:
    """Train stage only: student on an existing dataset (the teacher is never loaded).

    Runs on several GPUs/processes unchanged: `accelerate launch -m pipeline.cli train CONFIG`.
    """
    from pipeline.preflight import preflight
    from pipeline.train import train_student

    cfg = _config(config, set_)
    if dataset is None:
        _run(preflight, cfg, ["train"])
    res = _run(train_student, cfg, dataset_dir=dataset, resume=resume)
    if res.resumed_from_step:
        console.print(f"resumed from the checkpoint at step {res.resumed_from_step}")
    console.print(f"student {res.student_dir}: {res.steps} steps, final loss {res.final_loss:.4f} "
                  f"(ce {res.final_ce:.4f}, kd {res.final_kd:.4f}), {res.tokens_per_s:.0f} tok/s, {res.seconds:.1f}s")


@app.command("eval")
def eval_(config: ConfigArg, dataset: Annotated[Optional[Path], typer.Option()] = None,
          student: Annotated[Optional[Path], typer.Option(help="Student dir (default: output_dir/student).")] = None,
          set_: SetOpt = None) -> None:
    """Evaluate a student against the teacher on held-out prompts; writes metrics.json."""
    from pipeline.evaluate import evaluate

    print_metrics(_run(evaluate, _config(config, set_), dataset_dir=dataset, student_dir=student))


@app.command()
def validate(dataset: Annotated[Path, typer.Argument(help="Dataset directory.")]) -> None:
    """Check manifest, checksums, schema and invariants; exit 1 with the first problem."""
    from pipeline.dataset.validate import validate_dataset

    rep = _run(validate_dataset, dataset)
    state = "complete" if rep.complete else "incomplete (generation can be resumed)"
    console.print(f"[green]ok[/]: {rep.shards} shards, {rep.samples} samples, {rep.tokens} tokens, {state}")


@app.command("prepare-demo")
def prepare_demo(out: Annotated[Path, typer.Option(help="Where the demo teacher goes.")] = Path("data/models/demo-teacher"),
                 steps: Annotated[int, typer.Option(help="Teacher training steps (about 3 minutes on 2 cores).")] = 750,
                 seconds: Annotated[float, typer.Option(help="Upper bound on teacher training time.")] = 1800.0) -> None:
    """Build the demo task's tokenizer and teacher if they are not there yet."""
    from pipeline.demo.build import ensure_demo_teacher

    path = _run(ensure_demo_teacher, out, max_steps=steps, max_seconds=seconds,
                log=lambda m: err_console.print(m, highlight=False))
    info = json.loads((Path(path) / "distill_demo.json").read_text())
    console.print(f"demo teacher {path}: {info.get('steps')} steps, greedy accuracy {info.get('greedy_accuracy', float('nan')):.3f}, "
                  f"sampled accuracy {info.get('sampled_accuracy', float('nan')):.3f}")
    if info.get("greedy_accuracy", 0) < 0.5:
        err_console.print(f"[bold yellow]warning:[/] the demo teacher is weak (stopped at {info.get('steps')} steps after "
                          f"{info.get('seconds')}s); delete {path} and rerun `make demo` on a less busy machine")


if __name__ == "__main__":
    sys.exit(app())
