"""How the CLI shows results: rich tables of a run's stages and metrics, a dataset's summary and one sample's
tokens (`distill run`, `eval`, `inspect`)."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

console = Console()


def print_summary(out) -> None:
    """Stage times, teacher vs student metrics, and where everything was written (`out`: the flow's RunOutput)."""
    table = Table(title="distill run", show_header=True)
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("result")
    if out.generate:
        g = out.generate
        note = "cached: teacher not started" if g.cached or not g.teacher_loaded else "teacher ran"
        table.add_row("generate", f"{out.seconds['generate']:.1f}", f"{g.samples} samples, {g.tokens} tokens, {note}")
    if out.train:
        t = out.train
        table.add_row(
            "train",
            f"{out.seconds['train']:.1f}",
            f"{t.steps} steps, loss {t.final_loss:.4f}, {t.tokens_per_s:.0f} tok/s",
        )
    if out.eval:
        table.add_row("eval", f"{out.seconds['eval']:.1f}", f"{out.eval['heldout_prompts']} held-out prompts")
    for rnd in out.rounds:
        parts = [f"{rnd.dataset.samples} own samples scored" if rnd.dataset else None]
        parts.append(
            ("trained " + f"{rnd.train.steps} steps") if rnd.trained else ("kept" if rnd.train is None else None)
        )
        if rnd.metrics:
            own = rnd.metrics["on_policy"]
            parts.append(f"kl {rnd.metrics['student']['kl']:.4f}, reverse kl on own samples {own['reverse_kl']:.4f}")
        table.add_row(
            f"round {rnd.round}", f"{out.seconds[f'round {rnd.round}']:.1f}", "; ".join(p for p in parts if p)
        )
    console.print(table)
    if out.eval:
        print_metrics(out.eval)
    if out.rounds and out.rounds[-1].metrics:
        console.print(f"[bold]after round {out.rounds[-1].round}[/bold]")
        print_metrics(out.rounds[-1].metrics)
    for name, path in out.paths.items():
        console.print(f"  {name:8s} {path}")


def print_metrics(metrics: dict) -> None:
    keys = [
        "accuracy",
        "greedy_accuracy",
        "kl",
        "kl_uncertain",
        "kl_deterministic",
        "top1_agreement",
        "topk_mass",
        "ce",
        "perplexity",
    ]
    table = Table(title="held-out: teacher vs student")
    table.add_column("metric")
    table.add_column("teacher", justify="right")
    table.add_column("student", justify="right")
    fmt = lambda v: "" if v is None else f"{v:.4f}"
    for key in keys:
        if key in metrics["student"] or key in metrics["teacher"]:
            table.add_row(key, fmt(metrics["teacher"].get(key)), fmt(metrics["student"].get(key)))
    console.print(table)
    if metrics.get("lm_eval"):
        from pipeline.benchmarks import rows

        bench = Table(title="lm-evaluation-harness: teacher vs student")
        for column in ("task", "metric", "teacher", "student", "student stderr"):
            bench.add_column(column, justify="left" if column in ("task", "metric") else "right")
        for row in rows(metrics["lm_eval"]):
            values = (row["teacher"], row["student"], row["student_stderr"])
            bench.add_row(row["task"], row["metric"], *map(fmt, values))
        console.print(bench)


def print_inspect(summary) -> None:
    from pipeline.dataset.summary_text import summary_rows

    table = Table(title=f"dataset {summary.dataset_dir}", show_header=False)
    table.add_column("metric")
    table.add_column("value", overflow="fold")
    group = None
    for row in summary_rows(summary):
        if row["group"] != group:
            if group is not None:
                table.add_section()
            group = row["group"]
            table.add_row(f"[bold]{group}[/]", "")
        table.add_row(f"  {row['metric']}", row["value"])
    console.print(table)


def print_sample(view, top: int = 4) -> None:
    """One row per generated token: what was sampled, how sure the teacher was, and its top candidates."""
    from rich.text import Text

    console.print(Text(f"sample {view.index} ({view.sample_id}), finish: {view.finish_reason}"))
    console.print(Text(f"prompt:     {view.prompt!r}"))
    console.print(Text(f"completion: {view.completion!r}"))
    if not view.decoded:
        console.print("[yellow]token texts are ids: the teacher's tokenizer was not found locally[/]")
    table = Table(show_header=True)
    for name, justify in (
        ("pos", "right"),
        ("token", "left"),
        ("p", "right"),
        ("rank", "right"),
        ("entropy", "right"),
        (f"teacher top-{top}", "left"),
    ):
        table.add_column(name, justify=justify)
    for t in view.tokens:
        top_text = "  ".join(f"{text!r} {p:.3f}".replace(" 0.", " .") for _, text, p in t.candidates[:top])
        table.add_row(
            str(t.position),
            Text(repr(t.text)),
            f"{math.exp(t.logprob):.3f}",
            str(t.rank) if t.rank is not None else f">{view.k}",
            f"{t.entropy:.3f}",
            Text(top_text),
        )
    console.print(table)
