"""Every reach into another library's private API, in one place, each with why it is needed.

tests/test_compat.py pins what each one relies on, so an upgrade that changes it fails there, not in a run.
"""

from __future__ import annotations

import torch


def tied_names(model: torch.nn.Module) -> dict[str, list[str]]:
    """{kept name: [tied aliases]} of a plain (unsharded) module, chosen as safetensors' save_model chooses.

    Why private: checkpoints write gathered weights with save_file and must drop the same aliases save_model
    drops, so the file is the one save_model(student) writes; safetensors has no public function for that
    choice, only `safetensors.torch._remove_duplicate_names` (safetensors 0.4-0.8).
    """
    from safetensors.torch import _remove_duplicate_names

    return dict(_remove_duplicate_names(model.state_dict()))


def set_process_distributed_type(distributed_type) -> None:
    """Make accelerate's process-wide `PartialState` report `distributed_type` (an accelerate DistributedType).

    Why private: turning MULTI_CPU processes into FSDP ones (distributed._fsdp_on_cpu) must change the state every
    PartialState instance shares; accelerate keeps it in the class attribute `PartialState._shared_state` (a dict
    every instance's __dict__ is) and has no setter (accelerate 1.15).
    """
    from accelerate.state import PartialState

    PartialState._shared_state["distributed_type"] = distributed_type


def share_no_split_modules(wrapper: torch.nn.Module, model: torch.nn.Module) -> None:
    """Give `wrapper` the `_no_split_modules` of the transformers `model` it holds.

    Why private: accelerate's FSDP TRANSFORMER_BASED_WRAP reads `_no_split_modules` (transformers' private list of
    block classes, e.g. LlamaDecoderLayer) from the module it prepares, to shard each decoder layer on its own; the
    prepared module is our wrapper, not the transformers model.
    """
    wrapper._no_split_modules = getattr(model, "_no_split_modules", None)
