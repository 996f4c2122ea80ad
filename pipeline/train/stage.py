"""The train stage as one call (`train_student`: setup, fit, save) and what it writes: the student directory,
train_log.json and the loss curves."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.distributed import full_weights, is_fsdp, student_only
from pipeline.progress import plot_curves
from pipeline.train.loop import LIVE_PARTS, Fit, fit
from pipeline.train.setup import Setup, setup


@dataclass
class TrainResult:
    """What a training run returns (and train_log.json records under "result")."""

    student_dir: str
    steps: int
    final_loss: float
    final_ce: float
    final_kd: float
    tokens_per_s: float
    seconds: float
    train_samples: int
    resumed_from_step: int = 0
    final_live: dict[str, float] = field(default_factory=dict)
    """The last logged live-teacher parts (feature, attention, relation; unweighted), when a run has them."""


def save(s: Setup, f: Fit) -> TrainResult:
    """Write the student as an HF model directory with its tokenizer, train_log.json and loss_curves.png (rank 0)."""
    acc = s.accelerator
    last_log = f.history[-1]
    result = TrainResult(
        str(s.student_dir),
        s.cfg.train.max_steps,
        last_log["loss"],
        last_log["ce"],
        last_log["kd"],
        f.tokens_seen / f.seconds if f.seconds > 0 else 0.0,
        f.seconds,
        s.stream.num_samples,
        s.start_step,
        {name: last_log[name] for name in LIVE_PARTS if name in last_log},
    )
    distributed = {
        "type": acc.distributed_type.value,
        "processes": acc.num_processes,
        "fsdp_version": acc.state.fsdp_plugin.fsdp_version if is_fsdp(acc) else None,
    }
    weights = full_weights(acc, s.model, s.objective, s.tied) if is_fsdp(acc) else None  # collective
    weights = student_only(weights) if weights is not None else None  # live projections stay out of the student
    if acc.is_main_process:
        s.student.eval()
        s.student_dir.mkdir(parents=True, exist_ok=True)
        # under FSDP the module holds shards: save the gathered full weights (same files as one process)
        s.student.save_pretrained(s.student_dir, state_dict=weights, safe_serialization=True)
        s.tokenizer.save_pretrained(s.student_dir)
        (s.student_dir / "train_log.json").write_text(
            json.dumps(
                {
                    "result": asdict(result),
                    "history": f.history,
                    "config": s.cfg.train.model_dump(),
                    "distributed": distributed,
                    "vocab": vocab_report(s.vocab, f),
                },
                indent=2,
            )
        )
        plot_curves(f.history, s.student_dir / "loss_curves.png")
    acc.wait_for_everyone()
    return result


def vocab_report(sizes: dict[str, int], f: Fit) -> dict[str, int]:
    """train_log.json's "vocab": the three sizes and what was beyond the student's vocabulary, over the whole run."""
    entries, positions, sampled = f.out_of_vocab
    return {
        **{f"{name}_size": size for name, size in sizes.items()},
        "topk_entries_beyond_student": entries,
        "positions_beyond_student": positions,
        "sampled_beyond_student": sampled,
    }


def train_student(
    cfg: RunConfig,
    *,
    dataset_dir: Path | None = None,
    student_dir: Path | None = None,
    progress: bool = True,
    resume: bool = False,
) -> TrainResult:
    """Train the student on the dataset's training split and save it as an HF model directory.

    With `resume`, continue from the newest good checkpoint in `<student_dir>/checkpoints` (weights,
    optimizer, RNG and data position), giving the same result as an uninterrupted run.
    """
    s = setup(
        cfg,
        dataset_dir=Path(dataset_dir or cfg.dataset_dir),
        student_dir=Path(student_dir or cfg.student_dir),
        resume=resume,
    )
    return save(s, fit(s, progress=progress))
