"""The train stage: fit the student on the cached teacher top-k with alpha*CE + (1-alpha)*T^2*D.

`train_student` runs three functions in order: `setup` (data, student, accelerator, resume point), `fit` (the
loop, with checkpoints), then `save` (student directory, train_log.json, loss curves).

An explicit loop (nanoGPT-style): AdamW, warmup + cosine, gradient accumulation with a global token
denominator, clipping, optional gradient checkpointing, and resumable checkpoints. The LM head runs
only on completion positions, in chunks (see losses.py), so no B x T x V logits tensor exists. The same
function runs single-process or under `accelerate launch` / `torchrun` (DDP: each rank takes every
world-th micro-batch of one seeded, resumable stream (pipeline/dataset/stream.py), so N ranks equal one rank
with N-times the accumulation).
FSDP2 (accelerate's `--use_fsdp --fsdp_version 2`, or ACCELERATE_USE_FSDP=true FSDP_VERSION=2 under torchrun)
shards the student; checkpoints and the saved student are then gathered to full state dicts, so they
are the same files a single process writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pipeline.checkpoint import CheckpointMismatchError, checkpoint_root, clear, latest_checkpoint, save_checkpoint
from pipeline.compat import tied_names
from pipeline.config import RunConfig, TrainConfig
from pipeline.core import stable_id
from pipeline.dataset.batch import Batch
from pipeline.dataset.reader import longest_sample
from pipeline.dataset.schema import read_manifest
from pipeline.dataset.stream import TrainStream
from pipeline.distributed import (
    StudentWrapper,
    full_optimizer_state,
    full_weights,
    is_fsdp,
    load_checkpoint,
    make_accelerator,
    student_only,
)
from pipeline.live.capture import Recorder
from pipeline.live.plan import LivePlan, Projections, make_plan
from pipeline.live.teacher import LiveTeacher, combine_live, live_loss_sums, load_live_teacher, teacher_states
from pipeline.losses import LossSums, chunked_distill_loss_sums, combine, out_of_vocab_counts
from pipeline.models import (
    build_student,
    check_student_context,
    check_student_vocab,
    learned_positions,
    output_head,
    output_vocab_size,
    resolve_device,
    seed_everything,
    student_tokenizer,
)
from pipeline.progress import plot_curves, progress_bar
from pipeline.shards import teacher_context
from pipeline.trackers import accelerator_kwargs, end_trackers, log_row, start_trackers

log = logging.getLogger(__name__)


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


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup then cosine decay to 10% of the peak (a pure function of the step: nothing to checkpoint)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class DistillObjective(StudentWrapper):
    """Student + loss in one forward, so DDP/FSDP wrappers see (and synchronise) the whole step. With a live
    teacher (`plan`), the student's inner states are recorded in the same forward and compared with the teacher's
    (`teacher`, computed outside: the frozen teacher is not part of the wrapped, synchronised module); the
    projections that train beside the student are its `aux` child."""

    def __init__(self, student: torch.nn.Module, t: TrainConfig, plan: LivePlan | None = None):
        super().__init__(student)
        self.t, self.plan = t, plan
        if plan is not None:
            self.aux = Projections(plan)

    def forward(self, input_ids, attention_mask, loss_mask, labels, topk_ids, topk_logprobs, teacher=None):
        batch = Batch(input_ids, attention_mask, loss_mask, labels, topk_ids, topk_logprobs)
        if self.plan is None:
            sums = loss_sums(self.student, batch, self.t)
            live = sums.ce_sum.new_zeros(3)
        else:
            with Recorder(self.student, hidden=self.plan.student_hidden(), qkv=self.plan.student_qkv()) as rec:
                sums = loss_sums(self.student, batch, self.t)
            live = live_loss_sums(rec, teacher, self.plan, batch, self.aux)
        # clones, not views of one [2] tensor: FSDP2 hooks its backward on the outputs and warns about views
        return sums.ce_sum.clone(), sums.kd_sum.clone(), live


def loss_sums(model: torch.nn.Module, batch: Batch, t: TrainConfig) -> LossSums:
    """Run the trunk, gather completion positions, and compute CE/KD sums through the LM head in chunks."""
    trunk = getattr(model, model.base_model_prefix)
    hidden = trunk(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    return chunked_distill_loss_sums(
        hidden[batch.loss_mask],
        output_head(model),
        batch.labels,
        batch.topk_ids,
        batch.topk_logprobs,
        alpha=t.alpha,
        temperature=t.temperature,
        kind=t.kind,
        beta=t.beta,
        tail_bucket=t.tail_bucket,
        chunk_size=t.loss_chunk_size,
    )


def make_optimizer(model: torch.nn.Module, t: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (the student's, and the live projections')."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )


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


@dataclass
class Fit:
    """What the loop leaves behind: the logged history (resumed runs include the earlier steps) and its throughput."""

    history: list[dict]
    tokens_seen: int  # this process's run only, all ranks together
    seconds: float
    out_of_vocab: list[int] = field(default_factory=lambda: [0, 0, 0])  # `out_of_vocab_counts`, resumed runs included


def fit(s: Setup, *, progress: bool) -> Fit:
    """The loop: per step, set the learning rate, take this rank's share of the step's micro-batches, accumulate
    their gradients, clip, step; log every `log_every` steps and checkpoint every `checkpoint_every`."""
    t, acc = s.cfg.train, s.accelerator
    history = list(s.resumed["history"]) if s.resumed else []
    batches = s.stream.batches(start=s.resumed["data"] if s.resumed else None)
    tokens_seen, start = 0, time.perf_counter()
    oov = torch.tensor(s.resumed.get("out_of_vocab", [0, 0, 0]) if s.resumed else [0, 0, 0], device=s.device)
    n_vocab, pad = s.vocab.get("student", 0), s.tokenizer.pad_token_id
    with progress_bar("train", t.max_steps, enabled=progress and acc.is_main_process) as advance:
        advance(s.start_step)
        for step in range(s.start_step, t.max_steps):
            for group in s.opt.param_groups:
                group["lr"] = lr_at(step, t)
            step_batches = [next(batches) for _ in range(acc.num_processes * t.grad_accum)]
            micro = [b.to(s.device) for b in step_batches[acc.process_index :: acc.num_processes]]
            if n_vocab:  # ids the student has no row for: counted, then left out (losses.py folds labels and top-k)
                oov += sum(out_of_vocab_counts(b.topk_ids, b.labels, n_vocab) for b in micro)
                micro = [b.within_vocab(n_vocab, pad) for b in micro]
            parts, n_global = accumulate(s, micro)
            grad_norm = float(acc.clip_grad_norm_(s.model.parameters(), t.max_grad_norm))
            s.opt.step()
            s.opt.zero_grad(set_to_none=True)
            tokens_seen += n_global
            last = step == t.max_steps - 1
            if step % t.log_every == 0 or last:
                values = (acc.reduce(parts, "sum") if acc.num_processes > 1 else parts).tolist()
                loss_v, ce_v, kd_v = values[:3]
                rate = tokens_seen / (time.perf_counter() - start)
                history.append(
                    {
                        "step": step + 1,
                        "loss": loss_v,
                        "ce": ce_v,
                        "kd": kd_v,
                        **{name: values[3 + LIVE_PARTS.index(name)] for name in t.live_families},
                        "lr": lr_at(step, t),
                        "grad_norm": grad_norm,
                        "tokens_per_s": rate,
                    }
                )
                log_row(acc, s.cfg, history[-1])
                live = "".join(f" {name} {history[-1][name]:.4f}" for name in t.live_families)
                log.info(
                    "step %d/%d loss %.4f ce %.4f kd %.4f%s %.0f tok/s",
                    step + 1, t.max_steps, loss_v, ce_v, kd_v, live, rate,
                )  # fmt: skip
            if t.checkpoint_every and (step + 1) % t.checkpoint_every == 0 and not last:
                tokens_before = s.resumed["tokens_seen"] if s.resumed else 0
                write_checkpoint(s, step + 1, history, tokens_before + tokens_seen, _total(acc, oov, s.resumed))
            advance(1, info=f"loss {float(parts[0]):.4f} (ce {float(parts[1]):.3f} kd {float(parts[2]):.4f})")
    end_trackers(acc, s.cfg)
    oov_total = _total(acc, oov, s.resumed)
    if any(oov_total):
        log.warning(
            "%d top-k entries at %d positions and %d sampled tokens were beyond the student's %d-token vocabulary",
            *oov_total, n_vocab,
        )  # fmt: skip
    return Fit(history, tokens_seen, time.perf_counter() - start, oov_total)


def _total(acc, oov: torch.Tensor, resumed: dict | None) -> list[int]:
    """Out-of-vocabulary counts of all ranks (a collective); a resumed run's `oov` already holds the earlier ones,
    counted once (rank 0's share carries them)."""
    if acc.num_processes == 1:
        return [int(x) for x in oov.tolist()]
    earlier = torch.tensor(resumed.get("out_of_vocab", [0, 0, 0]) if resumed else [0, 0, 0], device=oov.device)
    own = oov - earlier if acc.process_index else oov
    return [int(x) for x in acc.reduce(own, "sum").tolist()]


LIVE_PARTS = ("feature", "attention", "relation")
"""The live-teacher loss parts, in the order the objective returns them (logged under these names)."""


def accumulate(s: Setup, micro: list[Batch]) -> tuple[torch.Tensor, int]:
    """Forward and backward over this rank's micro-batches of one step, each loss a share of the step's global
    per-token mean (per micro-batch mean for the relation loss). Returns (loss, ce, kd, feature, attention,
    relation) of this rank's share as a [6] tensor (the last three unweighted), and the step's global token count."""
    acc, t = s.accelerator, s.cfg.train
    world = acc.num_processes
    n_local = sum(b.n_tokens for b in micro)
    n_global = int(acc.reduce(torch.tensor(n_local, device=s.device), "sum")) if world > 1 else n_local
    batches_global = len(micro) * world  # every rank takes the same number of micro-batches per step
    parts = torch.zeros(6, device=s.device)
    for i, batch in enumerate(micro):
        # gradients are all-reduced once per step, on the last micro-batch
        with contextlib.nullcontext() if i == len(micro) - 1 else acc.no_sync(s.model):
            with _autocast(s.device):
                teacher = teacher_states(s.live, batch) if s.live else None
                ce_sum, kd_sum, live_sums = s.model(
                    batch.input_ids,
                    batch.attention_mask,
                    batch.loss_mask,
                    batch.labels,
                    batch.topk_ids,
                    batch.topk_logprobs,
                    teacher,
                )
            loss, ce, kd = combine(
                LossSums(ce_sum, kd_sum, batch.n_tokens),
                alpha=t.alpha,
                temperature=t.temperature,
                n_tokens_global=n_global,
            )
            live_loss, live_means = combine_live(
                live_sums, t, n_tokens_global=n_global, n_batches_global=batches_global
            )
            loss = loss + live_loss
            acc.backward(loss * world)  # DDP/FSDP average gradients over ranks; we want the global sum
        parts += torch.cat([torch.stack([loss.detach(), ce, kd]), live_means])
    return parts, n_global


def _autocast(device: torch.device):
    """bf16 autocast on CUDA; float32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def write_checkpoint(
    s: Setup, step: int, history: list[dict], tokens_seen: int, out_of_vocab: list[int] | None = None
) -> None:
    """Checkpoint `step`: weights and optimizer gathered on every rank (collective under FSDP), written by rank 0."""
    acc = s.accelerator
    acc.wait_for_everyone()
    weights = full_weights(acc, s.model, s.objective)
    optim_state = full_optimizer_state(acc, s.model, s.objective, s.opt)
    if acc.is_main_process:
        save_checkpoint(
            checkpoint_root(s.student_dir),
            step,
            model_state=weights,
            optimizer_state=optim_state,
            tied=s.tied,
            keep=s.cfg.train.keep_checkpoints,
            state={
                "fingerprint": s.fingerprint,
                "data": s.stream.position,
                "history": history,
                "tokens_seen": tokens_seen,
                "out_of_vocab": out_of_vocab or [0, 0, 0],
            },
        )
    del weights, optim_state
    acc.wait_for_everyone()


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
