"""Safety defaults: safetensors only, `torch.load(weights_only=True)`, no remote code unless asked, servers on
127.0.0.1.

The API key's path (from the environment, used, and written nowhere) is checked end to end with a real
server in test_teacher_server.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline.config import HFTeacherConfig, StudentConfig, VLLMServerTeacherConfig
from pipeline.models import ModelLoadError, load_causal_lm
from pipeline.teachers.managed import ManagedServer

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("flows/**/*.py"), *ROOT.glob("bench/**/*.py")])


def _calls(name: str):
    """(file, call node) for every call whose function is spelled `...name` in the project's own code."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                spelled = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if spelled == name:
                    yield path.relative_to(ROOT), node


def _keyword(node: ast.Call, name: str):
    return next((k.value for k in node.keywords if k.arg == name), None)


def test_every_torch_load_is_weights_only():
    loads = list(_calls("load"))
    torch_loads = [
        (p, n) for p, n in loads if isinstance(n.func, ast.Attribute) and getattr(n.func.value, "id", "") == "torch"
    ]
    assert torch_loads, "expected the checkpoint code to call torch.load"
    bad = [
        f"{p}:{n.lineno}"
        for p, n in torch_loads
        if not (isinstance(_keyword(n, "weights_only"), ast.Constant) and _keyword(n, "weights_only").value is True)
    ]
    assert not bad, f"torch.load without weights_only=True at {bad}"


def test_remote_code_is_never_trusted_by_a_literal():
    literal = [
        f"{p}:{n.lineno}"
        for name in ("from_pretrained", "from_config")
        for p, n in _calls(name)
        if isinstance(_keyword(n, "trust_remote_code"), ast.Constant) and _keyword(n, "trust_remote_code").value
    ]
    assert not literal, f"trust_remote_code=True hard-coded at {literal}"


def test_trust_remote_code_is_off_unless_the_config_turns_it_on():
    assert not HFTeacherConfig(model="m").trust_remote_code
    assert not StudentConfig(model="m").trust_remote_code
    server = VLLMServerTeacherConfig(model="m")
    assert not server.trust_remote_code
    assert "--trust-remote-code" not in ManagedServer(server, max_logprobs=20, log_path=Path("x.log")).command()
    on = VLLMServerTeacherConfig(model="m", trust_remote_code=True)
    assert "--trust-remote-code" in ManagedServer(on, max_logprobs=20, log_path=Path("x.log")).command()


def test_managed_server_binds_loopback_only():
    cmd = ManagedServer(VLLMServerTeacherConfig(model="m"), max_logprobs=20, log_path=Path("x.log")).command()
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"


def test_weights_load_from_safetensors_only(tiny_teacher, tmp_path):
    """A model directory with only a pickled `pytorch_model.bin` is refused rather than unpickled."""
    import shutil

    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_teacher, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(load_file(tiny_teacher / "model.safetensors"), pickled / "pytorch_model.bin")  # the legacy pickle format
    with pytest.raises(ModelLoadError):
        load_causal_lm(str(pickled))
    load_causal_lm(str(tiny_teacher))  # the same weights as safetensors load fine
