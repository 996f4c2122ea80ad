"""The train stage: loss falls, alpha=1 is plain CE, tokenizer mismatch stops before any step."""

import json

import pytest
import torch

from pipeline.dataset.reader import load_samples
from pipeline.dataset.stream import TrainStream
from pipeline.models import TokenizerMismatchError, load_causal_lm
from pipeline.train import loss_sums, train_student
from tests.helpers import model_with_another_tokenizer


def test_a_few_steps_lower_the_loss(generated, tmp_path):
    cfg = generated.model_copy(update={"train": generated.train.model_copy(update={"max_steps": 30, "lr": 3e-3})})
    res = train_student(cfg, student_dir=tmp_path / "student", progress=False)
    log = json.loads((tmp_path / "student/train_log.json").read_text())["history"]
    first, last = log[0]["loss"], log[-1]["loss"]
    assert last < 0.8 * first, (first, last)
    assert res.train_samples == len(load_samples(generated.dataset_dir, split="train")) < 96
    assert (tmp_path / "student/model.safetensors").is_file() and (tmp_path / "student/tokenizer.json").is_file()
    assert (tmp_path / "student/loss_curves.png").stat().st_size > 1000
    load_causal_lm(str(tmp_path / "student"))  # a normal HF model directory


def test_alpha_one_is_plain_cross_entropy(generated):
    from pipeline.models import build_student

    model = build_student(generated.student, generated.teacher.model, seed=0)
    batch, _ = next(TrainStream(generated.dataset_dir, split="all", batch_size=4, pad_id=0).in_order())  # samples 0-3
    t = generated.train.model_copy(update={"alpha": 1.0})
    sums = loss_sums(model, batch, t)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[batch.loss_mask]
    ref = torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum")
    torch.testing.assert_close(sums.ce_sum, ref, rtol=1e-5, atol=1e-4)
    assert float(sums.kd_sum.detach()) == 0.0


def test_tokenizer_mismatch_stops_before_training(generated, tmp_path):
    other = model_with_another_tokenizer(tmp_path / "other")
    student = generated.student.model_copy(update={"model": str(other), "shrink": None})
    cfg = generated.model_copy(update={"student": student})
    with pytest.raises(TokenizerMismatchError, match="differs from the dataset's teacher tokenizer"):
        train_student(cfg, student_dir=tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_shrunk_student_has_float32_weights_even_from_a_bf16_teacher(generated, tmp_path):
    from transformers import AutoConfig

    from pipeline.models import build_student

    cfg = AutoConfig.from_pretrained(generated.teacher.model)
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(tmp_path)
    model = build_student(generated.student, str(tmp_path), seed=0)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_checkpoint_rekeying_prefix_comes_from_the_wrapper(generated):
    """The prepared module's state-dict keys are the student's under `student_prefix()`, found where the wrapper
    registers the student (distributed.py rekeys checkpoints with it; no copy of the attribute name to drift)."""
    from pipeline.models import build_student
    from pipeline.train import DistillObjective

    student = build_student(generated.student, generated.teacher.model, seed=0)
    wrapper = DistillObjective(student, generated.train)
    prefix = wrapper.student_prefix()
    assert prefix == "student."
    assert list(wrapper.state_dict()) == [prefix + k for k in student.state_dict()]
    assert wrapper._no_split_modules == student._no_split_modules  # FSDP auto-wrap sees the decoder layers
