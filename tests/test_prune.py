"""`student.from_teacher`: a student cut from the teacher's layers (optionally narrower), its weights copied."""

from __future__ import annotations

import pytest
import torch

from pipeline import prune
from pipeline.config import ConfigError, FromTeacherConfig, StudentConfig, build_config
from pipeline.models import build_student

HF = {"teacher": {"model": "t"}, "prompts": {"path": "p.jsonl"}}


def llama(tmp_path, *, tied=False, layers=4, seed=0):
    """A tiny grouped-query Llama teacher saved with save_pretrained: 4 query heads over 2 key/value heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=tied, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so that folding their gains into the ranking is exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / "teacher")
    return model, str(tmp_path / "teacher")


def student(path: str, **from_teacher) -> torch.nn.Module:
    return build_student(StudentConfig(from_teacher=FromTeacherConfig(**from_teacher)), path, seed=0).eval()


def ids():
    return torch.randint(0, 40, (3, 11), generator=torch.Generator().manual_seed(1))


# ---- config, checked before anything loads -------------------------------------------------------------------


@pytest.mark.parametrize(
    "value,message",
    [
        ([2, 1], "increasing order without repeats"),
        ([0, 0], "increasing order without repeats"),
        ([], "increasing order without repeats"),
        ([-1, 2], "increasing order without repeats"),
        (0, "keep at least 1 layer"),
        ("every_third", "give a list of layer indices, `every_other` or a layer count"),
        (True, "give a list of layer indices"),
    ],
)
def test_bad_layer_specs_are_one_line_config_errors(value, message):
    with pytest.raises(ConfigError) as err:
        build_config({**HF, "student": {"from_teacher": {"layers": value}}})
    assert str(err.value).startswith("config key 'student.from_teacher.layers': ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_heads_must_divide_into_key_value_groups_and_one_source_only():
    with pytest.raises(ConfigError, match=r"num_attention_heads \(6\) must be a multiple of num_key_value_heads \(4\)"):
        build_config({**HF, "student": {"from_teacher": {"num_attention_heads": 6, "num_key_value_heads": 4}}})
    with pytest.raises(ConfigError, match="set exactly one of student.model .* or student.from_teacher"):
        build_config({**HF, "student": {"from_teacher": {}, "shrink": {"hidden_size": 64}}})
    cfg = build_config({**HF, "student": {"from_teacher": {"layers": "every_other", "hidden_size": 64}}})
    assert cfg.student.from_teacher.layers == "every_other" and cfg.student.from_teacher.hidden_size == 64


def test_kept_layers_every_other_counts_and_lists():
    assert prune.kept_layers(None, 4) == [0, 1, 2, 3]
    assert prune.kept_layers("every_other", 5) == [0, 2, 4]
    assert prune.kept_layers(3, 8) == [0, 4, 7]  # evenly spread, first and last kept
    assert prune.kept_layers(4, 24) == [0, 8, 15, 23]
    assert prune.kept_layers(1, 6) == [0]
    assert prune.kept_layers(6, 6) == [0, 1, 2, 3, 4, 5]
    assert prune.kept_layers([1, 3], 4) == [1, 3]


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"layers": [0, 4]}, "lists layer 4, but the teacher has layers 0..3; drop it"),
        ({"layers": 5}, "keeps more layers than the teacher has (4); use at most 4"),
        ({"hidden_size": 64}, "hidden_size=64 is wider than the teacher's 32"),
        ({"num_attention_heads": 3}, "num_attention_heads=3 is not a multiple of the teacher's 2 query heads"),
        ({"num_attention_heads": 4, "num_key_value_heads": 1}, "4 query heads over 1 key/value heads cannot be cut"),
    ],
)
def test_a_plan_the_teacher_cannot_give_fails_before_its_weights_load(tmp_path, spec, message):
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
    ).save_pretrained(tmp_path)  # a config and no weights: loading them would be a ModelLoadError
    with pytest.raises(ConfigError) as err:
        student(str(tmp_path), **spec)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_narrowing_a_gpt2_teacher_is_refused_in_one_line():
    from transformers import GPT2Config

    with pytest.raises(ConfigError, match="can narrow Llama-style models only .* a gpt2 teacher can only keep layers"):
        prune.plan(FromTeacherConfig(hidden_size=16), GPT2Config(n_layer=2, n_embd=32, n_head=4))


# ---- the copied weights ----------------------------------------------------------------------------------------


def test_all_layers_at_full_width_is_the_teacher(tmp_path):
    teacher, path = llama(tmp_path)
    s = student(path)
    x = ids()
    assert torch.equal(s(x).logits, teacher(x).logits)
    assert s.config.num_hidden_layers == 4 and {p.dtype for p in s.parameters()} == {torch.float32}


def test_student_layer_i_is_teacher_layer_layers_i(tmp_path):
    teacher, path = llama(tmp_path)
    s = student(path, layers=[0, 3])
    t_sd, s_sd = teacher.state_dict(), s.state_dict()
    assert s.config.num_hidden_layers == 2 and len(s_sd) == len(t_sd) - 2 * 9  # 9 tensors per Llama layer
    for key, value in s_sd.items():
        src = key.replace("layers.1.", "layers.3.")
        assert torch.equal(value, t_sd[src]), key
    assert torch.isfinite(s(ids()).logits).all()


def test_narrowing_copies_exact_slices_of_whole_heads_and_groups(tmp_path):
    teacher, path = llama(tmp_path)
    s = student(path, layers=[1, 2], hidden_size=24, intermediate_size=20, num_attention_heads=2)
    sd, t = s.state_dict(), teacher.state_dict()
    # the teacher's 2 query heads per key/value head are kept: 2 heads are 1 whole group
    assert (s.config.num_attention_heads, s.config.num_key_value_heads, s.config.head_dim) == (2, 1, 8)
    plan = prune.plan(FromTeacherConfig(layers=[1, 2], hidden_size=24, intermediate_size=20, num_attention_heads=2),
                      teacher.config)  # fmt: skip
    index = prune.select(plan, t)
    h = index["hidden"]
    assert len(h) == 24 and torch.equal(h, torch.sort(h).values)
    assert torch.equal(sd["model.embed_tokens.weight"], t["model.embed_tokens.weight"][:, h])
    assert torch.equal(sd["lm_head.weight"], t["lm_head.weight"][:, h])
    assert torch.equal(sd["model.norm.weight"], t["model.norm.weight"][h])
    for i, src in enumerate([1, 2]):
        q, kv, mlp = (index["layers"][src][k] for k in ("q", "kv", "mlp"))
        assert len(q) == 16 and len(kv) == 8 and len(mlp) == 20
        (group,) = set((q // 16).tolist())  # both query heads are of the kept key/value group (2 heads per group)
        assert torch.equal(kv, torch.arange(8) + 8 * group)
        assert torch.equal(q.reshape(2, 8) % 8, torch.arange(8).expand(2, 8))  # whole heads: all 8 dims of each
        pre, tpre = f"model.layers.{i}.", f"model.layers.{src}."
        assert torch.equal(sd[pre + "self_attn.q_proj.weight"], t[tpre + "self_attn.q_proj.weight"][q][:, h])
        assert torch.equal(sd[pre + "self_attn.k_proj.weight"], t[tpre + "self_attn.k_proj.weight"][kv][:, h])
        assert torch.equal(sd[pre + "self_attn.v_proj.weight"], t[tpre + "self_attn.v_proj.weight"][kv][:, h])
        assert torch.equal(sd[pre + "self_attn.o_proj.weight"], t[tpre + "self_attn.o_proj.weight"][h][:, q])
        assert torch.equal(sd[pre + "mlp.gate_proj.weight"], t[tpre + "mlp.gate_proj.weight"][mlp][:, h])
        assert torch.equal(sd[pre + "mlp.down_proj.weight"], t[tpre + "mlp.down_proj.weight"][h][:, mlp])
        assert torch.equal(sd[pre + "input_layernorm.weight"], t[tpre + "input_layernorm.weight"][h])
    assert torch.isfinite(s(ids()).logits).all()


def test_narrowing_keeps_the_channels_heads_and_neurons_with_the_largest_weights(tmp_path):
    teacher, _ = llama(tmp_path)
    with torch.no_grad():
        teacher.model.embed_tokens.weight[:, 5] *= 100  # residual channel 5
        attn = teacher.model.layers[0].self_attn
        attn.o_proj.weight[:, 3 * 8 : 4 * 8] *= 100  # query head 3 (key/value group 1)
        teacher.model.layers[0].mlp.down_proj.weight[:, 7] *= 100  # MLP neuron 7
    spec = FromTeacherConfig(
        layers=[0], hidden_size=8, intermediate_size=1, num_attention_heads=1, num_key_value_heads=1
    )
    index = prune.select(prune.plan(spec, teacher.config), teacher.state_dict())
    assert 5 in index["hidden"].tolist()
    assert torch.equal(index["layers"][0]["q"], torch.arange(24, 32))
    assert torch.equal(index["layers"][0]["kv"], torch.arange(8, 16))
    assert index["layers"][0]["mlp"].tolist() == [7]


def test_tied_embeddings_stay_tied(tmp_path):
    teacher, path = llama(tmp_path, tied=True)
    s = student(path, layers="every_other", hidden_size=16)
    assert s.config.tie_word_embeddings
    assert s.lm_head.weight.data_ptr() == s.model.embed_tokens.weight.data_ptr()
    h = prune.select(prune.plan(FromTeacherConfig(hidden_size=16, layers="every_other"), teacher.config),
                     teacher.state_dict())["hidden"]  # fmt: skip
    assert torch.equal(s.lm_head.weight, teacher.model.embed_tokens.weight[:, h])


def test_a_qwen2_teacher_narrows_with_its_attention_biases(tmp_path):
    """Qwen2: q/k/v biases (sliced with their rows), no head_dim in its config (the student's is set)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    teacher = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    teacher.save_pretrained(tmp_path / "qwen")
    assert torch.equal(student(str(tmp_path / "qwen"))(ids()).logits, teacher(ids()).logits)
    spec = {"layers": 2, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 24}
    s = student(str(tmp_path / "qwen"), **spec)
    index = prune.select(prune.plan(FromTeacherConfig(**spec), teacher.config), teacher.state_dict())
    assert s.config.head_dim == 8 and s.model.layers[1].self_attn.q_proj.weight.shape == (16, 16)
    q, kv = index["layers"][2]["q"], index["layers"][2]["kv"]
    attn, t_attn = s.model.layers[1].self_attn, teacher.model.layers[2].self_attn
    assert torch.equal(attn.q_proj.bias, t_attn.q_proj.bias[q]) and torch.equal(
        attn.k_proj.bias, t_attn.k_proj.bias[kv]
    )
    assert torch.isfinite(s(ids()).logits).all()


def test_gpt2_keeps_layers_by_renaming(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=32, n_embd=16, n_layer=3, n_head=2)).eval()
    teacher.save_pretrained(tmp_path / "gpt2")
    s = student(str(tmp_path / "gpt2"), layers=[0, 2])
    t_sd = teacher.state_dict()
    for key, value in s.state_dict().items():
        assert torch.equal(value, t_sd[key.replace("h.1.", "h.2.")]), key
    assert s.lm_head.weight.data_ptr() == s.transformer.wte.weight.data_ptr()
    full = student(str(tmp_path / "gpt2"))
    assert torch.equal(full(ids()).logits, teacher(ids()).logits)


def test_an_every_other_layer_student_trains(generated, tmp_path):
    import json

    from pipeline.models import load_causal_lm
    from pipeline.train import train_student

    update = {"from_teacher": FromTeacherConfig(layers="every_other"), "shrink": None}
    # copied weights are a trained start: at the random student's peak lr (3e-3) the first steps throw it off
    train = generated.train.model_copy(update={"max_steps": 8, "log_every": 1, "lr": 3e-4})
    cfg = generated.model_copy(update={"student": generated.student.model_copy(update=update), "train": train})
    cfg = type(cfg).model_validate(cfg.model_dump())  # through validation, as a YAML config would be
    teacher_layers = load_causal_lm(generated.teacher.model, device="cpu").config.num_hidden_layers
    train_student(cfg, student_dir=tmp_path / "student", progress=False)
    history = json.loads((tmp_path / "student/train_log.json").read_text())["history"]
    losses = [row["loss"] for row in history]
    assert len(losses) == 8 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0] < 1.0  # starts near the teacher (a random student starts above 4)
    saved = load_causal_lm(str(tmp_path / "student"), device="cpu")  # a plain HF model directory
    assert saved.config.num_hidden_layers == (teacher_layers + 1) // 2


def test_distill_run_refuses_a_layer_the_teacher_lacks_before_writing_anything(tiny_teacher, prompts_file, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from pipeline.cli import app
    from tests.conftest import raw_config
    from tests.helpers import one_line_error

    raw = raw_config(tiny_teacher, prompts_file, tmp_path / "run")
    raw["student"] = {"from_teacher": {"layers": [0, 9]}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["run", str(tmp_path / "cfg.yaml")])
    one_line_error(result, "student.from_teacher.layers lists layer 9, but the teacher has layers 0..")
    assert not (tmp_path / "run").exists()
