"""The train stage: fit the student on the cached teacher top-k with alpha*CE + (1-alpha)*T^2*D.

`train_student` runs three functions in order: `setup` (data, student, accelerator, resume point), `fit` (the
loop, with checkpoints), then `save` (student directory, train_log.json, loss curves): `setup.py`, `loop.py` and
`stage.py`; `objective.py` holds what a step optimises (student + loss as one module, LR schedule, optimizer).

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

from pipeline.train.loop import LIVE_PARTS, accumulate, fit, write_checkpoint
from pipeline.train.objective import DistillObjective, loss_sums, lr_at, make_optimizer
from pipeline.train.setup import Setup, setup
from pipeline.train.stage import TrainResult, save, train_student

__all__ = [
    "LIVE_PARTS",
    "DistillObjective",
    "Setup",
    "TrainResult",
    "accumulate",
    "fit",
    "loss_sums",
    "lr_at",
    "make_optimizer",
    "save",
    "setup",
    "train_student",
    "write_checkpoint",
]
