"""`distill run` in re-score mode: given completions (a JSONL of prompt/completion pairs through the managed vLLM
server; a chat-format `datasets` directory through transformers) are scored, trained on and evaluated."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from typer.testing import CliRunner

from flows.distill import distill_flow
from pipeline.cli import app
from pipeline.config import build_config
from pipeline.dataset.schema import read_manifest
from pipeline.demo.task import make_prompts, sample_completion
from tests.conftest import raw_config
from tests.helpers import TEACHER_PYTHON, needs_vllm, refuse_teacher, write_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]  # a Prefect API per module
runner = CliRunner()


def _sft(n: int, seed: int) -> list[tuple[str, str]]:
    """Prompts with a correct answer each: the supervised text a user already has."""
    rng = random.Random(seed)
    return [(p, sample_completion(p, rng)) for p in make_prompts(n, seed)]


def _run(config, *args: str) -> None:
    result = runner.invoke(app, ["run", str(config), *args])
    assert result.exit_code == 0, result.output + repr(result.exception)


@needs_vllm
def test_rescore_a_jsonl_of_pairs_through_the_vllm_server(tiny_teacher, tmp_path):
    source = tmp_path / "sft.jsonl"
    source.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in _sft(80, seed=4)))
    raw = raw_config(
        tiny_teacher,
        source,
        tmp_path / "run",
        teacher={
            "backend": "vllm_server",
            "model": str(tiny_teacher),
            "python": TEACHER_PYTHON,
            "dtype": "float32",
            "max_model_len": 128,
            "gpu_memory_utilization": 0.3,
            "cpu_kvcache_space_gb": 1,
            "extra_args": ["--enforce-eager"],
        },
        generate={"mode": "rescore"},
    )
    _run(write_config(tmp_path / "cfg.yaml", raw))
    dataset = tmp_path / "run" / "dataset"
    m = read_manifest(dataset)
    assert m.mode == "rescore" and m.teacher.backend == "vllm_server" and m.total_samples == 80
    assert m.completions.source == str(source) and m.completions.field == "completion"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["reference"] == "given completions"
    assert metrics["teacher"]["accuracy"] == 1.0, "the given completions are all correct answers"
    assert metrics["student"]["kl"] > 0 and metrics["heldout_prompts"] > 0
    assert json.loads((tmp_path / "run" / "student" / "train_log.json").read_text())["history"]


def test_rescore_a_chat_datasets_directory_with_transformers(tiny_teacher, tmp_path, monkeypatch):
    import datasets

    from pipeline.models import load_tokenizer
    from tests.test_rescore import CHAT_TEMPLATE

    teacher = tmp_path / "chat-teacher"  # the tiny teacher with a chat template in its tokenizer
    shutil.copytree(tiny_teacher, teacher)
    tok = load_tokenizer(str(teacher))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(teacher)
    chats = [[{"role": "user", "content": p}, {"role": "assistant", "content": c.strip()}] for p, c in _sft(64, 5)]
    datasets.Dataset.from_dict({"messages": chats}).save_to_disk(str(tmp_path / "chats"))
    raw = raw_config(
        teacher,
        tmp_path / "chats",
        tmp_path / "run",
        prompts={"field": "messages", "chat_template": True},
        generate={"mode": "rescore"},
        eval={"task": "none"},
    )
    _run(write_config(tmp_path / "cfg.yaml", raw))
    m = read_manifest(tmp_path / "run" / "dataset")
    assert m.mode == "rescore" and m.completions.field == "messages[-1]" and m.total_samples == 64
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["reference"] == "given completions" and metrics["student"]["positions"] > 0
    # rerunning only the student stage on the re-scored dataset starts no teacher (in this process: a second
    # CliRunner invocation trips over Prefect's console log handler holding the first one's closed stdout)
    refuse_teacher(monkeypatch)
    out = distill_flow(build_config(raw), stages=["train", "eval"])
    assert out.generate is None and out.eval["reference"] == "given completions"
