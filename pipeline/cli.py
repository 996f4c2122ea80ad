"""`distill` command line: each command calls the same stage function the Prefect flow calls."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pipeline.cli_tables import console, print_inspect, print_metrics, print_sample, print_summary

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Offline knowledge distillation: a teacher writes top-k logprobs to Parquet, a student learns from them.",
)
err_console = Console(stderr=True)
_state = {"debug": False}

ConfigArg = Annotated[Path, typer.Argument(help="YAML run config (see configs/).")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="Override a config key: train.lr=1e-3 (repeatable).")
]


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _run(fn, *args, **kwargs):
    """Call a stage; a user error (`pipeline.core.UserError`, a full disk) becomes one line and exit 1.

    Anything else is a bug and keeps its traceback; `--debug` shows the traceback of user errors too.
    """
    from pipeline.core import as_user_error

    try:
        return fn(*args, **kwargs)
    except Exception as err:
        user = as_user_error(err)
        if user is None or _state["debug"]:
            raise
        _fail(str(user).splitlines()[0] if str(user) else type(user).__name__)
    except KeyboardInterrupt:
        _fail("interrupted; committed shards are kept and the next run resumes from them")


def _config(path: Path, overrides: list[str] | None):
    from pipeline.config import load_config

    return _run(load_config, path, overrides or [])


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
) -> None:
    _state["debug"] = debug
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file weight loading bars drown the stage progress
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def _stages(stages: str) -> list[str]:
    """The comma-separated --stages list, each checked against the flow's stages."""
    from pipeline.config import STAGES

    wanted = [s.strip() for s in stages.split(",") if s.strip()]
    bad = [s for s in wanted if s not in STAGES]
    if bad:
        _fail(f"unknown stage {bad[0]!r}; choose from {', '.join(STAGES)}")
    return wanted


@app.command()
def run(
    config: ConfigArg,
    stages: Annotated[str, typer.Option(help="Comma-separated: generate,train,eval.")] = "generate,train,eval",
    resume: Annotated[bool, typer.Option(help="Train from the newest good checkpoint of an interrupted run.")] = False,
    task_runner: Annotated[
        str, typer.Option(help="Where shard tasks run: thread (this process) or ray (prefect-ray).")
    ] = "thread",
    ray_address: Annotated[
        str | None, typer.Option(help="With --task-runner ray: a running cluster's address (default: a local one).")
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Run the Prefect flow (ephemeral local API unless PREFECT_API_URL is set)."""
    cfg = _config(config, set_)
    wanted = _stages(stages)
    if task_runner not in ("thread", "ray"):
        _fail(f"unknown task runner {task_runner!r}; choose from thread, ray")
    if ray_address and task_runner != "ray":
        _fail("--ray-address needs --task-runner ray")
    from pipeline.preflight import preflight

    _run(preflight, cfg, wanted)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pipeline")  # stage logs appear in the Prefect run
    logging.getLogger("pipeline").setLevel(logging.INFO)
    from flows.api import local_api
    from flows.distill import distill_flow
    from flows.distill import task_runner as make_runner

    flow_ = distill_flow
    if task_runner != "thread":
        flow_ = distill_flow.with_options(task_runner=_run(make_runner, task_runner, ray_address))
    with local_api():  # Prefect's local API, taken down with this process even by kill -9
        out = _run(flow_, cfg, stages=wanted, resume=resume)
    print_summary(out)


@app.command()
def schedule(
    config: ConfigArg,
    cron: Annotated[str | None, typer.Option(help='Cron expression in UTC, e.g. "0 3 * * *" (03:00 daily).')] = None,
    interval: Annotated[float | None, typer.Option(help="Run every SECONDS instead of on a cron.")] = None,
    stages: Annotated[str, typer.Option(help="Comma-separated: generate,train,eval.")] = "generate,train,eval",
    name: Annotated[str | None, typer.Option(help="Deployment name (default: the config's name).")] = None,
    set_: SetOpt = None,
) -> None:
    """Serve the flow as deployment distill/NAME on a schedule; runs execute here until Ctrl-C (needs a server:
    PREFECT_API_URL)."""
    cfg = _config(config, set_)
    wanted = _stages(stages)
    from flows.deploy import build_deployment, make_schedule, require_server, serve_deployment
    from pipeline.preflight import preflight

    when = _run(make_schedule, cron=cron, interval=interval)
    _run(preflight, cfg, wanted)
    url = _run(require_server)
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pipeline")
    deployment = build_deployment(cfg, wanted, schedule=when, name=name)
    console.print(
        f"deployment distill/{deployment.name} on {url}: {cron or f'every {interval:g}s'}, stages {','.join(wanted)}"
    )
    serve_deployment(deployment)


@app.command()
def generate(config: ConfigArg, set_: SetOpt = None) -> None:
    """Generate stage only: teacher -> Parquet dataset (resumes an interrupted run)."""
    from pipeline.generate import generate_dataset
    from pipeline.preflight import preflight

    cfg = _config(config, set_)
    _run(preflight, cfg, ["generate"])
    res = _run(generate_dataset, cfg)
    state = "teacher ran" if res.teacher_loaded else "already complete, teacher not started"
    console.print(
        f"dataset {res.dataset_dir}: {res.samples} samples, {res.tokens} tokens ({state}, {res.seconds:.1f}s)"
    )


@app.command()
def train(
    config: ConfigArg,
    dataset: Annotated[Path | None, typer.Option(help="Dataset dir (default: output_dir/dataset).")] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from the newest good checkpoint in <student>/checkpoints.")
    ] = False,
    set_: SetOpt = None,
) -> None:
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
    live = "".join(f", {name} {value:.4f}" for name, value in res.final_live.items())
    console.print(
        f"student {res.student_dir}: {res.steps} steps, final loss {res.final_loss:.4f} "
        f"(ce {res.final_ce:.4f}, kd {res.final_kd:.4f}{live}), "
        f"{res.tokens_per_s:.0f} tok/s, {res.seconds:.1f}s"
    )


@app.command("eval")
def eval_(
    config: ConfigArg,
    dataset: Annotated[Path | None, typer.Option()] = None,
    student: Annotated[Path | None, typer.Option(help="Student dir (default: output_dir/student).")] = None,
    set_: SetOpt = None,
) -> None:
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


@app.command()
def inspect(
    dataset: Annotated[Path, typer.Argument(help="Dataset directory.")],
    sample: Annotated[int | None, typer.Option(help="Show sample N (0-based) token by token.")] = None,
    report: Annotated[Path | None, typer.Option(help="Write a self-contained HTML report here.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Summarize a dataset (lengths, teacher entropy, top-k coverage, sampled ranks); one sample; an HTML report."""
    from pipeline.dataset.schema import read_manifest
    from pipeline.dataset.stats import summarize
    from pipeline.dataset.views import sample_view
    from pipeline.models import token_decoder

    view = None
    if sample is not None or report is not None:
        manifest = _run(read_manifest, dataset)
        decoder = token_decoder(manifest.teacher.model, manifest.tokenizer_fingerprint)
        view = _run(sample_view, dataset, sample or 0, decoder=decoder)
    if sample is not None and report is None:
        if json_:
            typer.echo(view.model_dump_json(indent=2))
        else:
            print_sample(view)
        return
    summary = _run(summarize, dataset)
    if json_:
        typer.echo(summary.model_dump_json(indent=2))
    else:
        print_inspect(summary)
    if report is not None:
        from pipeline.dataset.report import render_report

        path = _run(render_report, summary, view, report)
        err_console.print(f"report {path} (sample {view.index})", highlight=False)


@app.command("prepare-demo")
def prepare_demo(
    out: Annotated[Path, typer.Option(help="Where the demo teacher goes.")] = Path("data/models/demo-teacher"),
    steps: Annotated[int, typer.Option(help="Teacher training steps (about 3 minutes on 2 cores).")] = 750,
    seconds: Annotated[float, typer.Option(help="Upper bound on teacher training time.")] = 1800.0,
) -> None:
    """Build the demo task's tokenizer and teacher if they are not there yet."""
    from pipeline.demo.build import ensure_demo_teacher

    path = _run(
        ensure_demo_teacher,
        out,
        max_steps=steps,
        max_seconds=seconds,
        log=lambda m: err_console.print(m, highlight=False),
    )
    info = json.loads((Path(path) / "distill_demo.json").read_text())
    console.print(
        f"demo teacher {path}: {info.get('steps')} steps, greedy accuracy "
        f"{info.get('greedy_accuracy', float('nan')):.3f}, "
        f"sampled accuracy {info.get('sampled_accuracy', float('nan')):.3f}"
    )
    if info.get("greedy_accuracy", 0) < 0.5:
        err_console.print(
            f"[bold yellow]warning:[/] the demo teacher is weak (stopped at {info.get('steps')} steps after "
            f"{info.get('seconds')}s); delete {path} and rerun `make demo` on a less busy machine"
        )


if __name__ == "__main__":
    sys.exit(app())
