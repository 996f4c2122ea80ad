"""What pipeline/compat.py relies on in other libraries' private APIs: these fail when an upgrade changes it."""

import inspect

import pytest
import torch
from safetensors.torch import load_file, save_model
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.compat import set_process_distributed_type, share_no_split_modules, tied_names


def _tiny_llama(tie: bool) -> LlamaForCausalLM:
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=16,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            tie_word_embeddings=tie,
        )
    )


def test_tied_names_are_the_aliases_save_model_drops(tmp_path):
    """safetensors' `_remove_duplicate_names` still exists and picks the names save_model keeps."""
    model = _tiny_llama(tie=True)
    tied = tied_names(model)
    assert tied == {"lm_head.weight": ["model.embed_tokens.weight"]}
    save_model(model, str(tmp_path / "m.safetensors"))
    dropped = {alias for group in tied.values() for alias in group}
    assert set(load_file(str(tmp_path / "m.safetensors"))) == set(model.state_dict()) - dropped
    assert tied_names(_tiny_llama(tie=False)) == {}


def test_partial_state_shares_its_distributed_type_through_the_private_dict():
    """accelerate keeps the process-wide state in `PartialState._shared_state`, the __dict__ of every instance."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(cpu=True)
    before = state.distributed_type
    try:
        set_process_distributed_type(DistributedType.FSDP)
        assert PartialState().distributed_type == DistributedType.FSDP
    finally:
        set_process_distributed_type(before)
    assert PartialState().distributed_type == before


def test_accelerate_still_refuses_fsdp_on_cpu_processes():
    """The reason for the workaround: AcceleratorState switches to FSDP only for accelerator devices. When this fails,
    accelerate may honour ACCELERATE_USE_FSDP on MULTI_CPU itself and distributed._fsdp_on_cpu can go."""
    from accelerate.state import AcceleratorState

    source = inspect.getsource(AcceleratorState.__init__)
    before = source[: source.index('os.environ.get("ACCELERATE_USE_FSDP"')]
    branch = before[before.rindex("elif self.distributed_type in [") :]
    devices = branch[: branch.index("]:")]  # the device types whose processes may become FSDP
    assert "DistributedType.MULTI_GPU" in devices and "DistributedType.MULTI_CPU" not in devices


def test_fsdp_auto_wrap_reads_no_split_modules_from_the_prepared_module():
    """transformers declares the block classes in `_no_split_modules`; accelerate's FSDP auto-wrap reads that name."""
    from accelerate.utils import fsdp_utils

    assert LlamaForCausalLM._no_split_modules == ["LlamaDecoderLayer"]
    assert 'getattr(model, "_no_split_modules", None)' in inspect.getsource(fsdp_utils)
    wrapper = torch.nn.Module()
    share_no_split_modules(wrapper, _tiny_llama(tie=False))
    assert set(wrapper._no_split_modules) == {"LlamaDecoderLayer"}


@pytest.mark.parametrize("name", ["_remove_duplicate_names"])
def test_the_private_safetensors_function_keeps_its_signature(name):
    import safetensors.torch

    params = inspect.signature(getattr(safetensors.torch, name)).parameters
    assert list(params)[0] == "state_dict"
