"""Everything the loop needs, built once: data stream, student, accelerator, optimizer, live teacher, and the
resume point (the newest good checkpoint whose key matches, or a clean start)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.checkpoint import CheckpointMismatchError, checkpoint_root, clear, latest_checkpoint
from pipeline.compat import tied_names
from pipeline.config import RunConfig
from pipeline.core import stable_id
from pipeline.dataset.reader import longest_sample
from pipeline.dataset.schema import read_manifest
from pipeline.dataset.stream import TrainStream
from pipeline.distributed import load_checkpoint, make_accelerator
from pipeline.live.plan import make_plan
from pipeline.live.teacher import LiveTeacher, load_live_teacher
from pipeline.models import (
    build_student,
    check_student_context,
    check_student_vocab,
    learned_positions,
    output_vocab_size,
    resolve_device,
    seed_everything,
    student_tokenizer,
)
from pipeline.shards import teacher_context
from pipeline.trackers import accelerator_kwargs, start_trackers
from pipeline.train.objective import DistillObjective, make_optimizer

log = logging.getLogger(__name__)


def _resume_point(root: Path, fingerprint: str, load) -> dict | None:
    """State of the newest good checkpoint, restored by `load(ckpt)`; None to start fresh."""
    ckpt = latest_checkpoint(root)
    if ckpt is None:
        log.warning("no usable checkpoint under %s; training starts from step 0", root)
        return None
    if ckpt.state.get("fingerprint") != fingerprint:
        raise CheckpointMismatchError(
            f"checkpoints in {root} come from a run with other student/training settings or another dataset; "
            "train without --resume (they are replaced) or restore the original config"
        )
    load(ckpt)
    log.info("resuming from %s (step %d)", ckpt.path, ckpt.step)
    return ckpt.state


@dataclass
class Setup:
    """What the loop needs, built by `setup`."""

    cfg: RunConfig
    student_dir: Path
    tokenizer: object
    stream: TrainStream
    accelerator: object
    device: torch.device
    objective: DistillObjective  # the student inside; `model` is it as accelerate prepared it (DDP, FSDP2 or as is)
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    tied: dict[str, list[str]]  # tied weight aliases, dropped from saved weights
    fingerprint: str  # what a checkpoint must match to be resumed
    resumed: dict | None  # the resumed checkpoint's state; None for a fresh run
    live: LiveTeacher | None = None  # the teacher in this process, for the feature/attention/relation losses
    vocab: dict[str, int] = field(default_factory=dict)  # student, teacher and tokenizer sizes (`vocab_sizes`)

    @property
    def student(self) -> torch.nn.Module:
        return self.objective.student

    @property
    def start_step(self) -> int:
        return self.resumed["step"] if self.resumed else 0


def student_on(cfg: RunConfig, device: torch.device) -> torch.nn.Module:
    """The student to train, with gradient checkpointing if asked for, on `device` in train mode."""
    student = build_student(cfg.student, cfg.teacher.model, seed=cfg.train.seed)
    if cfg.train.gradient_checkpointing:
        enable = getattr(student, "activation_checkpointing_enable", None)  # transformers >= 5.18 name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student.config.use_cache = False
    return student.to(device).train()


def setup(cfg: RunConfig, *, dataset_dir: Path, student_dir: Path, resume: bool) -> Setup:
    """Data stream, student, accelerator, prepared model and optimizer, restored from the newest checkpoint
    with `resume` (older checkpoints are cleared otherwise)."""
    t = cfg.train
    if t.kind != "forward_kl" and not t.tail_bucket:
        log.warning(
            "train.kind=%s without train.tail_bucket sees the student only renormalised over the teacher's top-k: "
            "moving the student's mass off the top-k costs nothing; set train.tail_bucket: true",
            t.kind,
        )
    manifest = read_manifest(dataset_dir)
    tokenizer = student_tokenizer(cfg, manifest.tokenizer_fingerprint)
    # streamed one row group at a time: memory does not grow with the dataset
    stream = TrainStream(
        dataset_dir,
        split="train",
        batch_size=t.batch_size,
        pad_id=tokenizer.pad_token_id,
        seed=t.seed,
        mix=[(Path(m.path), m.repeat) for m in t.mix],
    )
    # picks up `accelerate launch` / torchrun's environment; a plain call is one process
    accelerator = make_accelerator(t, **accelerator_kwargs(cfg))
    start_trackers(accelerator, cfg)
    device = accelerator.device if t.device == "auto" else resolve_device(t.device)
    seed_everything(t.seed)
    student = student_on(cfg, device)
    vocab = vocab_sizes(cfg, student, tokenizer, manifest.teacher.vocab_size)
    check_context(cfg, student, dataset_dir)
    live = None
    if t.live_teacher:
        teacher = load_live_teacher(cfg, manifest.tokenizer_fingerprint, device)
        live = LiveTeacher(teacher, make_plan(t, student, teacher))
        if not t.live_families:
            log.warning("train.live_teacher is on but no feature/attention/relation weight is: it runs for nothing")
    objective = DistillObjective(student, t, live.plan if live else None).to(device)
    tied = tied_names(student)
    shapes = {k: tuple(v.shape) for k, v in objective.own_weights().items()}
    # optimizer and model prepared together: FSDP replaces the parameters with sharded ones (DDP keeps them)
    model, opt = accelerator.prepare(objective, make_optimizer(objective, t, device))
    fingerprint = stable_id(cfg.train_fingerprint(), manifest.generate_fingerprint, *stream.mix_fingerprints)
    root = checkpoint_root(student_dir)
    load = lambda ckpt: load_checkpoint(ckpt, accelerator, model, objective, opt, tied=tied, shapes=shapes)
    state = _resume_point(root, fingerprint, load) if resume else None
    if state is None and accelerator.is_main_process:
        clear(root)  # checkpoints of an earlier run must not be resumed into this one
    return Setup(
        cfg, student_dir, tokenizer, stream, accelerator, device, objective, model, opt, tied, fingerprint, state, live,
        vocab,
    )  # fmt: skip


def vocab_sizes(cfg: RunConfig, student: torch.nn.Module, tokenizer, teacher_vocab: int) -> dict[str, int]:
    """The three vocabulary sizes; a student smaller than the tokenizer is an error, a teacher larger than the
    student a warning (its extra ids are folded into the tail, docs/design.md "Vocabulary sizes")."""
    sizes = {"student": output_vocab_size(student), "teacher": teacher_vocab, "tokenizer": len(tokenizer)}
    source = cfg.student.model or ("student.from_teacher" if cfg.student.from_teacher else "student.shrink")
    check_student_vocab(sizes["student"], sizes["tokenizer"], source)
    if sizes["teacher"] > sizes["student"]:
        log.warning(
            "the teacher scores %d token ids, the student %d (tokenizer: %d): top-k ids >= %d go to the tail "
            "(train.tail_bucket) or are dropped and renormalised, and sampled ones get no CE; counts in train_log.json",
            sizes["teacher"], sizes["student"], sizes["tokenizer"], sizes["student"],
        )  # fmt: skip
    return sizes


def check_context(cfg: RunConfig, student: torch.nn.Module, dataset_dir: Path) -> None:
    """A student with learned positions (GPT-2 style) must have a row for every position of the longest sample;
    the data is read only when its table is shorter than the teacher's context (which bounds every sample)."""
    positions = learned_positions(student)
    if positions is None:
        return
    teacher = teacher_context(cfg)
    if teacher is not None and positions >= teacher and not cfg.train.mix:
        return
    longest = max(longest_sample(d) for d in [dataset_dir, *(Path(m.path) for m in cfg.train.mix)])
    check_student_context(positions, longest, cfg.student.model or "student.shrink / student.from_teacher")
