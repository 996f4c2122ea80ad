"""The dataset summary as formatted rows `{group, metric, value}`: what `distill inspect` prints, the flow's
dataset artifact and the HTML report show (the numbers come from `stats.summarize`)."""

from __future__ import annotations

import numpy as np

from pipeline.dataset.stats import MASS_LEVELS, NEAR_ONE_HOT, DatasetSummary


def _quantile_k(counts: list[int], q: float) -> str:
    """The number of candidates that suffices at a share q of positions, as text (">k" if the top-k never does)."""
    total = sum(counts)
    if not total:
        return "n/a"
    j = int(np.searchsorted(np.cumsum(counts), q * total)) + 1
    return f">{len(counts) - 1}" if j == len(counts) else str(j)


def _pct(x: float | None) -> str:
    if x is None:
        return "n/a"
    return "<0.1%" if 0 < x < 0.001 else f"{100 * x:.1f}%"


def _num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _mode(s: DatasetSummary) -> str:
    if s.mode != "rescore" or s.completions is None:
        return "sample: the teacher's own completions"
    c = s.completions
    return f"rescore: given completions ({c.source}, {c.field}, {c.truncated} truncated) scored by the teacher"


def _vocab(s: DatasetSummary) -> str:
    size = s.teacher.tokenizer_size
    return f"{s.teacher.vocab_size} (tokenizer: {size if size is not None else 'not recorded'})"


def _beyond(s: DatasetSummary) -> str:
    """Top-k entries and samples at padding-row ids (no text; a smaller student folds them into the tail)."""
    if s.topk_beyond_tokenizer is None or s.sampled_beyond_tokenizer is None:
        return "n/a (tokenizer size not recorded)"
    k_total = max(1, s.tokens * s.k)
    return (
        f"{s.topk_beyond_tokenizer:,} top-k entries ({_pct(s.topk_beyond_tokenizer / k_total)}), "
        f"{s.sampled_beyond_tokenizer:,} sampled tokens"
    )


def summary_rows(summary: DatasetSummary) -> list[dict[str, str]]:
    """The summary as flat rows `{"group", "metric", "value"}` (values formatted), for tables and artifacts."""
    s, n = summary, max(1, summary.tokens)
    rows: list[tuple[str, str, str]] = [
        ("dataset", "samples", f"{s.samples:,}"),
        ("dataset", "prompts", f"{s.prompts:,}"),
        ("dataset", "completion tokens", f"{s.tokens:,}"),
        ("dataset", "shards", f"{s.shards} ({'complete' if s.complete else 'incomplete'})"),
        (
            "dataset",
            "finish reasons",
            ", ".join(
                f"{k} {v:,} ({_pct(v / max(1, s.samples))})"
                for k, v in sorted(s.finish_reasons.items(), key=lambda kv: -kv[1])
            ),
        ),
        (
            "dataset",
            "completion length (tokens)",
            f"mean {s.length.mean:.1f}, min {s.length.min}, p50 {s.length.p50}, p90 {s.length.p90}, p99 "
            f"{s.length.p99}, max {s.length.max}",
        ),
        ("teacher distribution", "entropy (nats, top-k + tail bucket)", f"mean {_num(s.entropy.mean)}"),
        (
            "teacher distribution",
            "top-1 probability",
            f"mean {_num(s.top1.mean)}; >= {NEAR_ONE_HOT}: {_pct(s.near_one_hot)} of positions",
        ),
        ("teacher distribution", f"top-{s.k} mass (coverage)", f"mean {_num(s.coverage.mean, 4)}"),
    ]
    for level in MASS_LEVELS:
        counts = s.k_needed[str(level)]
        rows.append(
            (
                "teacher distribution",
                f"k for {level:.0%} of the mass",
                f"median {_quantile_k(counts, 0.5)}, p90 {_quantile_k(counts, 0.9)}, p99 {_quantile_k(counts, 0.99)}; "
                f">{s.k}: {_pct(counts[-1] / n if s.tokens else None)} of positions",
            )
        )
    rank1, outside = s.sampled_rank[0], s.sampled_rank[-1]
    rows += [
        (
            "sampled tokens",
            "rank in teacher top-k (1-based)",
            f"rank 1: {_pct(rank1 / n if s.tokens else None)}, ranks 2-{s.k}: "
            f"{_pct((s.tokens - rank1 - outside) / n if s.tokens else None)}, outside top-{s.k}: "
            f"{_pct(outside / n if s.tokens else None)}",
        ),
        ("sampled tokens", "mean teacher logprob", _num(s.sampled_logprob_mean)),
        ("teacher", "model", s.teacher.model),
        ("teacher", "backend", s.teacher.backend + "".join(f", {k} {v}" for k, v in s.teacher.versions.items())),
        ("teacher", "vocab size", _vocab(s)),
        ("teacher", "ids beyond the tokenizer", _beyond(s)),
        ("teacher", "k, logprobs", f"k={s.k}, {s.logprobs_mode} (T=1), {s.logprobs_dtype}"),
        ("sampling", "mode", _mode(s)),
        (
            "sampling",
            "settings",
            f"temperature {s.sampling.temperature}, top_p {s.sampling.top_p}, "
            f"max_new_tokens {s.sampling.max_new_tokens}, n {s.sampling.n}, seed {s.sampling.seed}"
            + (" (how eval samples the student)" if s.mode == "rescore" else ""),
        ),
        ("sampling", "prompts", f"{s.prompts_source} (held-out fraction {s.heldout_fraction})"),
        ("sampling", "created / updated", f"{s.created_at} / {s.updated_at}"),
    ]
    return [{"group": g, "metric": m, "value": v} for g, m, v in rows]
