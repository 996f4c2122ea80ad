"""A one-file HTML report of a dataset: summary table, plots, and one sample coloured by teacher uncertainty.

Self-contained so it opens offline and can be mailed around: plots are matplotlib PNGs inlined as base64
data URIs, the CSS is inline, and there are no scripts or external URLs.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from pipeline.dataset.stats import MASS_LEVELS, DatasetSummary
from pipeline.dataset.summary_text import summary_rows
from pipeline.dataset.views import SampleView, TokenView

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table.summary { border-collapse: collapse; font-size: 0.92em; }
table.summary td { padding: 3px 10px; border-bottom: 1px solid #eee; vertical-align: top; }
table.summary td.group { color: #888; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
.plots img { width: 520px; border: 1px solid #eee; }
.sample { font-family: ui-monospace, "DejaVu Sans Mono", monospace; white-space: pre-wrap; line-height: 2;
          font-size: 1.1em;
          border: 1px solid #ddd; padding: 10px; }
.sample span.tok { padding: 2px 0; border-radius: 3px; }
.sample span.nontop { text-decoration: underline dotted #333; }
.prompt { color: #666; }
.legend { display: inline-block; width: 240px; height: 12px; vertical-align: middle; border: 1px solid #ccc; }
.note { color: #666; font-size: 0.9em; }
"""
CMAP = "YlOrRd"
CMAP_MAX = 0.85  # the darkest reds make black text unreadable


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def coverage_figure(s: DatasetSummary) -> Figure:
    """Mean top-j mass, and the share of positions whose top-j holds 90/95/99% of the mass, for j = 1..k."""
    fig = Figure(figsize=(6.2, 3.8))
    ax = fig.add_subplot()
    j = np.arange(1, s.k + 1)
    ax.plot(j, s.coverage_curve, "k-o", ms=3, label="mean top-j mass")
    for level in MASS_LEVELS:
        ax.step(j, s.k_needed_share(level), where="post", label=f"positions with >= {level:.0%} in top-j")
    ax.set(
        xlabel="j (top-j candidates)",
        ylabel="share",
        ylim=(0, 1.02),
        xlim=(0.5, s.k + 0.5),
        title="Top-k coverage of the teacher distribution",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def _log_counts(ax, counts: list[int]) -> None:
    # symlog keeps empty bins at 0 while showing rare bins next to common ones; headroom so no bar is clipped
    ax.set_yscale("symlog", linthresh=1)
    ax.set_ylim(0, max(10, 3 * max(counts, default=0)))
    ax.grid(alpha=0.3)


def _hist(ax, stat, color: str) -> None:
    edges = np.asarray(stat.histogram.edges)
    ax.bar(
        edges[:-1], stat.histogram.counts, width=np.diff(edges), align="edge", color=color, edgecolor="white", lw=0.3
    )
    _log_counts(ax, stat.histogram.counts)


def uncertainty_figure(s: DatasetSummary) -> Figure:
    """Histograms of per-position teacher entropy and top-1 probability (log count axis)."""
    fig = Figure(figsize=(6.2, 3.8))
    left, right = fig.subplots(1, 2)
    _hist(left, s.entropy, "#d95f02")
    left.set(xlabel="entropy (nats, top-k + tail)", ylabel="positions", title="Teacher entropy")
    _hist(right, s.top1, "#1b9e77")
    right.set(xlabel="top-1 probability", title="Teacher top-1 probability")
    fig.tight_layout()
    return fig


def length_figure(s: DatasetSummary) -> Figure:
    """Completion lengths in tokens, one bar per length."""
    fig = Figure(figsize=(6.2, 3.8))
    ax = fig.add_subplot()
    ax.bar(np.arange(len(s.length.counts)), s.length.counts, width=1.0, color="#7570b3", edgecolor="white", lw=0.3)
    _log_counts(ax, s.length.counts)
    ax.set(
        xlabel="completion length (tokens)", ylabel="samples", title=f"Completion lengths (mean {s.length.mean:.1f})"
    )
    return fig


def rank_figure(s: DatasetSummary) -> Figure:
    """Where the sampled token sat in the teacher's top-k (1-based), and how often outside it."""
    fig = Figure(figsize=(6.2, 3.8))
    ax = fig.add_subplot()
    labels = [str(r) for r in range(1, s.k + 1)] + ["out"]
    ax.bar(np.arange(len(labels)), s.sampled_rank, color=["#e7298a"] * s.k + ["#666666"])
    ax.set_xticks(np.arange(len(labels)), labels, fontsize=7)
    _log_counts(ax, s.sampled_rank)
    ax.set(xlabel="rank of the sampled token in the teacher top-k", ylabel="positions", title="Sampled-token rank")
    return fig


def entropy_color(entropy: float, k: int) -> str:
    """Background colour for a token: white at 0 nats to red at ln(k+1), the k+1-bucket maximum."""
    x = min(max(entropy / np.log(k + 1), 0.0), 1.0)
    return to_hex(colormaps[CMAP](x * CMAP_MAX))


def _token_span(tok: TokenView, k: int) -> str:
    shown = tok.text.replace("\n", "\u21b5\n") or "\u2205"
    rank = f"rank {tok.rank}" if tok.rank is not None else f"outside top-{k}"
    lines = [
        f"position {tok.position}, id {tok.token_id}: p={np.exp(tok.logprob):.3f} ({rank})",
        f"entropy {tok.entropy:.3f} nats, top-{k} mass {tok.coverage:.4f}",
    ]
    lines += [f"{p:7.3f}  {text!r}" for _, text, p in tok.candidates[:10]]
    cls = "tok" if tok.rank == 1 else "tok nontop"
    return (
        f'<span class="{cls}" style="background:{entropy_color(tok.entropy, k)}" '
        f'title="{html.escape(chr(10).join(lines))}">{html.escape(shown)}</span>'
    )


def sample_html(view: SampleView) -> str:
    """The prompt, then the completion with each token coloured by teacher entropy; hover shows the candidates."""
    gradient = ", ".join(to_hex(colormaps[CMAP](x * CMAP_MAX)) for x in np.linspace(0, 1, 6))
    note = "" if view.decoded else " Token texts are ids: the teacher's tokenizer was not found locally."
    return (
        f'<p class="note">Sample {view.index} (id {html.escape(view.sample_id)}, finish: '
        f"{html.escape(view.finish_reason)}). Background = teacher entropy, 0 "
        f'<span class="legend" style="background: linear-gradient(to right, {gradient})"></span> '
        f"{np.log(view.k + 1):.2f} nats; dotted underline = the sampled token was not the teacher's top-1; "
        f"hover a token for its top candidates.{note}</p>"
        f'<div class="sample"><span class="prompt">{html.escape(view.prompt)}</span>'
        + "".join(_token_span(t, view.k) for t in view.tokens)
        + "</div>"
    )


def render_report(summary: DatasetSummary, view: SampleView | None, out: Path) -> Path:
    """Write the report to `out` (parent directories created) and return its path."""
    rows = "".join(
        f'<tr><td class="group">{html.escape(r["group"])}</td><td>{html.escape(r["metric"])}</td>'
        f"<td>{html.escape(r['value'])}</td></tr>"
        for r in summary_rows(summary)
    )
    figures = [
        ("coverage", coverage_figure),
        ("uncertainty", uncertainty_figure),
        ("lengths", length_figure),
        ("ranks", rank_figure),
    ]
    imgs = "".join(f'<img alt="{name}" src="{_png(make(summary))}">' for name, make in figures)
    body = (
        f"<h1>distill dataset: {html.escape(summary.dataset_dir)}</h1>"
        f'<table class="summary">{rows}</table>'
        f'<h2>Plots</h2><div class="plots">{imgs}</div>'
        + (f"<h2>A sample</h2>{sample_html(view)}" if view is not None else "")
        + '<h2>Definitions</h2><p class="note">Per generated position, from the teacher\'s raw (T=1) top-k '
        "logprobs: coverage = sum of exp(top-k logprobs); entropy over the k candidates plus the mass outside "
        "them as one extra bucket (a lower bound on the full-vocabulary entropy); k for p of the mass = "
        'the smallest j whose top-j mass reaches p ("&gt;k" if the top-k never does); sampled-token rank is '
        "1-based (1 = the teacher's most likely token).</p>"
    )
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>distill dataset report</title>'
        f"<style>{CSS}</style></head><body>{body}</body></html>\n"
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
