"""CUDA paths: the transformers teacher and the student stage on GPU (skipped without CUDA)."""

import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu


def test_hf_teacher_on_cuda_matches_cpu_logprobs(tiny_teacher):
    from pipeline.config import HFTeacherConfig
    from pipeline.demo.task import make_prompts
    from pipeline.models import load_tokenizer
    from pipeline.teachers.base import SamplingSpec
    from pipeline.teachers.hf import HFTeacher

    tok = load_tokenizer(str(tiny_teacher))
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in make_prompts(8, seed=9)]
    spec = SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_new_tokens=16, k=8, seed=0)
    cpu = HFTeacher(HFTeacherConfig(model=str(tiny_teacher), device="cpu")).generate(prompts, spec, seed=0)
    gpu = HFTeacher(HFTeacherConfig(model=str(tiny_teacher), device="cuda")).generate(prompts, spec, seed=0)
    for a, b in zip(cpu, gpu):
        n = min(len(a[0].completion_token_ids), len(b[0].completion_token_ids))
        np.testing.assert_allclose(a[0].topk_logprobs[:n], b[0].topk_logprobs[:n], atol=1e-3)


def test_student_trains_on_cuda_with_bf16_autocast(generated, tmp_path):
    from pipeline.train import train_student

    cfg = generated.model_copy(update={"train": generated.train.model_copy(update={"device": "cuda", "max_steps": 30})})
    train_student(cfg, student_dir=tmp_path / "student", progress=False)
    history = json.loads((tmp_path / "student/train_log.json").read_text())["history"]
    assert all(np.isfinite(h["loss"]) for h in history)
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    assert torch.cuda.max_memory_allocated() > 0
