"""Multi-process training plumbing: the Accelerator (one process, DDP or FSDP2, as the launcher's environment
says), the wrapper module it prepares, and full, unsharded state dicts for checkpoints and the saved student,
whatever the mode.

Under FSDP every rank holds shards, so gathering (`full_weights`, `full_optimizer_state`) and loading
(`load_checkpoint`) are collectives: every rank calls them, rank 0 reads and writes the files.
"""

from __future__ import annotations

import logging
import os

import torch

from pipeline.checkpoint import (
    AUX_PREFIX,
    Checkpoint,
    CheckpointMismatchError,
    read_aux,
    read_optimizer,
    read_weights,
    restore_rng,
    weight_shapes,
)
from pipeline.compat import set_process_distributed_type, share_no_split_modules
from pipeline.config import TrainConfig
from pipeline.core import UserError

log = logging.getLogger(__name__)


class FSDPSetupError(UserError):
    """FSDP was asked for in a form this loop does not support."""


class StudentWrapper(torch.nn.Module):
    """Base of the module handed to `accelerator.prepare`: the student as a submodule, so DDP/FSDP wrap the whole
    step (train.DistillObjective adds the loss). Checkpoints hold the student's own names: the rekeying below
    strips and adds `student_prefix()`, found where the student is registered here, not written down twice."""

    def __init__(self, student: torch.nn.Module):
        super().__init__()
        self.student = student
        share_no_split_modules(self, student)  # FSDP shards each decoder layer on its own

    def student_prefix(self) -> str:
        """The student's state-dict prefix inside this wrapper (e.g. "student.")."""
        return next(name for name, child in self.named_children() if child is self.student) + "."

    @property
    def aux(self) -> torch.nn.Module | None:
        """Modules trained beside the student but not part of it (registered as `aux`), or None."""
        return self._modules.get(AUX_PREFIX.rstrip("."))

    def checkpoint_name(self, name: str) -> str:
        """A wrapper parameter name as checkpoints hold it: the student's own name, or `aux.` + the aux module's."""
        return name if name.startswith(AUX_PREFIX) else name.removeprefix(self.student_prefix())

    def wrapper_name(self, name: str) -> str:
        """The inverse of `checkpoint_name`."""
        return name if name.startswith(AUX_PREFIX) else self.student_prefix() + name

    def own_weights(self) -> dict[str, torch.Tensor]:
        """The student's state dict plus the aux modules' under `aux.` (a plain, unsharded wrapper)."""
        aux = {AUX_PREFIX + k: v for k, v in self.aux.state_dict().items()} if self.aux is not None else {}
        return {**self.student.state_dict(), **aux}


def make_accelerator(t: TrainConfig, **tracking):
    """accelerate's Accelerator for this process: DDP, FSDP2 or one process, as the launcher's environment says;
    `tracking`: its experiment-tracker arguments (pipeline/trackers.py)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    # without a GPU, `device: auto` is the CPU: said explicitly, or accelerate 1.15 leaves each torchrun process
    # alone (DistributedType.NO) and they all write one checkpoint directory
    cpu = t.device == "cpu" or (t.device == "auto" and not torch.cuda.is_available())
    accelerator = Accelerator(cpu=cpu, **tracking)
    if (
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        and accelerator.distributed_type == DistributedType.MULTI_CPU
    ):
        _fsdp_on_cpu(accelerator)
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise FSDPSetupError(
            "FSDP version 1 is not supported by the train loop: use FSDP2 "
            "(`accelerate launch --use_fsdp --fsdp_version 2 ...`, or FSDP_VERSION=2)"
        )
    return accelerator


def _fsdp_on_cpu(accelerator) -> None:
    """Honour ACCELERATE_USE_FSDP on CPU processes (gloo), where accelerate would silently run DDP.

    accelerate 1.15 turns the request into DistributedType.FSDP only for accelerator devices
    (accelerate/state.py, AcceleratorState.__init__: the switch sits in the MULTI_GPU/MULTI_XPU/...
    branch; MULTI_CPU is not in it), and `accelerate launch` refuses `--cpu` with `--use_fsdp`.
    torch's FSDP2 (`fully_shard`) runs on CPU with gloo, and accelerate's FSDP2 code paths (prepare,
    no_sync, clip_grad_norm_) are device-agnostic, so this makes the switch accelerate makes on GPU:
    the plugin read from the same FSDP_* variables, and the distributed type on both shared states.
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    state.fsdp_plugin = FullyShardedDataParallelPlugin()
    state.distributed_type = DistributedType.FSDP
    set_process_distributed_type(DistributedType.FSDP)
    log.info(
        "FSDP on CPU (gloo): accelerate's FSDP%d plugin applied to MULTI_CPU processes", state.fsdp_plugin.fsdp_version
    )


def is_fsdp(accelerator) -> bool:
    """Whether the processes run FSDP (every rank holds shards: gathering and loading are collectives)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def full_weights(
    accelerator, model, wrapper: StudentWrapper, tied: dict[str, list[str]] | None = None
) -> dict[str, torch.Tensor]:
    """The student's full (unsharded) weights under their HF names on rank 0, {} elsewhere; modules trained beside
    it (`wrapper.aux`) are included under `aux.` (checkpoints keep them apart; `student_only` drops them).

    Collective under FSDP: every rank must call it. The gathered copies of a tied tensor (`tied`) are made
    one tensor again, so `save_pretrained` drops the alias as it does for the unsharded student.
    """
    if is_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        weights = {wrapper.checkpoint_name(k): v for k, v in full.items()}
        for kept, group in (tied or {}).items() if weights else ():
            for alias in group:
                weights[alias] = weights[kept]
        return weights
    return wrapper.own_weights() if accelerator.is_main_process else {}


def student_only(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights` without the aux entries: what the saved student directory holds."""
    return {k: v for k, v in weights.items() if not k.startswith(AUX_PREFIX)}


def _rekey_optimizer(osd: dict, rename) -> dict:
    """A name-keyed optimizer state dict with every parameter name passed through `rename`."""
    return {
        "state": {rename(k): v for k, v in osd["state"].items()},
        "param_groups": [{**g, "params": [rename(p) for p in g["params"]]} for g in osd["param_groups"]],
    }


def full_optimizer_state(accelerator, model, wrapper: StudentWrapper, opt) -> dict:
    """The full optimizer state keyed by the student's parameter names (rank 0; {} elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    inner = getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps the torch one
    osd = get_optimizer_state_dict(model, inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not accelerator.is_main_process:
        return {}
    return _rekey_optimizer(osd, wrapper.checkpoint_name)


def load_checkpoint(ckpt: Checkpoint, accelerator, model, wrapper: StudentWrapper, opt, *, tied, shapes) -> None:
    """Weights, optimizer and RNG of `ckpt` into the prepared model and optimizer (any mode wrote it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    found = weight_shapes(ckpt, tied)  # header only: every rank checks, so no rank waits in a collective alone
    if found != shapes:
        diff = sorted(set(found) ^ set(shapes)) or sorted(k for k in shapes if found[k] != shapes[k])
        raise CheckpointMismatchError(f"{ckpt.path} does not fit this student: {', '.join(diff[:3])} differ")
    fsdp, main = is_fsdp(accelerator), accelerator.is_main_process
    inner = getattr(opt, "optimizer", opt)
    osd = read_optimizer(ckpt) if main or not fsdp else {}
    legacy = bool(osd) and any(isinstance(k, int) for k in osd["state"])  # opt.state_dict() of older versions
    if fsdp:
        if accelerator.reduce(torch.tensor(int(legacy), device=accelerator.device), "sum").item():
            raise CheckpointMismatchError(
                f"{ckpt.path} has an index-keyed optimizer state (an older version wrote "
                "it); resume it without FSDP once, or train without --resume"
            )
        weights = {**read_weights(ckpt, tied), **read_aux(ckpt)} if main else {}
        weights = {wrapper.wrapper_name(k): v for k, v in weights.items()}
        # rank 0 reads the files; each rank receives only its shards
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, weights, options=options)
        set_optimizer_state_dict(
            model, inner, _rekey_optimizer(osd, wrapper.wrapper_name) if main else {}, options=options
        )
    else:
        wrapper.student.load_state_dict(read_weights(ckpt, tied), strict=True)
        if wrapper.aux is not None:
            aux = {k.removeprefix(AUX_PREFIX): v for k, v in read_aux(ckpt).items()}
            wrapper.aux.load_state_dict(aux, strict=True)
        if legacy:
            inner.load_state_dict(osd)
        else:
            set_optimizer_state_dict(
                model,
                inner,
                _rekey_optimizer(osd, wrapper.wrapper_name),
                options=StateDictOptions(full_state_dict=True),
            )
    restore_rng(ckpt)
