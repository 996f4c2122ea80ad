"""The live teacher in the train stage: the three families train from the config, every part is logged and adds up
to the loss, the projections stay out of the student but in checkpoints (resume is exact), and bad settings are
one line before training."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pipeline.train.loop as train_loop
from pipeline.checkpoint import checkpoint_root
from pipeline.config import ConfigError, build_config
from pipeline.live.capture import Recorder, decoder_layers, qkv_widths
from pipeline.live.plan import uniform_map
from pipeline.models import TokenizerMismatchError
from pipeline.train import train_student
from tests.helpers import model_with_another_tokenizer

ALL = {
    "live_teacher": True,
    "feature": {"weight": 0.5},
    "attention": {"weight": 2.0},
    "relation": {"weight": 3.0},
}


def _with_train(cfg, **train):
    return build_config({**cfg.model_dump(mode="json"), "train": {**cfg.train.model_dump(mode="json"), **train}})


def _history(student_dir: Path) -> list[dict]:
    return json.loads((student_dir / "train_log.json").read_text())["history"]


@pytest.fixture(scope="module")
def live_run(generated, tmp_path_factory):
    """Four steps with all three families, alpha 0.2, T 2, a checkpoint at step 2."""
    cfg = _with_train(
        generated, **ALL, alpha=0.2, temperature=2.0, max_steps=4, batch_size=8, checkpoint_every=2, keep_checkpoints=5
    )
    out = tmp_path_factory.mktemp("live") / "student"
    return cfg, out, train_student(cfg, student_dir=out, progress=False)


def test_every_part_is_logged_and_the_loss_is_their_weighted_sum(live_run):
    cfg, out, _ = live_run
    t = cfg.train
    for h in _history(out):
        assert {"feature", "attention", "relation"} <= set(h)
        assert h["feature"] > 0 and h["attention"] > 0 and h["relation"] >= 0
        want = (
            t.alpha * h["ce"]
            + (1 - t.alpha) * t.temperature**2 * h["kd"]
            + 0.5 * h["feature"]
            + 2.0 * h["attention"]
            + 3.0 * h["relation"]
        )
        assert h["loss"] == pytest.approx(want, rel=1e-5)
    assert (out / "loss_curves.png").stat().st_size > 0


def test_projections_are_in_checkpoints_not_in_the_student(live_run, generated, tmp_path):
    _, out, _ = live_run
    plain = train_student(_with_train(generated, max_steps=1, batch_size=8), student_dir=tmp_path / "p", progress=False)
    student = load_file(str(out / "model.safetensors"))
    assert student.keys() == load_file(str(Path(plain.student_dir) / "model.safetensors")).keys()
    aux = load_file(str(checkpoint_root(out) / "step-0000002" / "aux.safetensors"))
    # the student (width 64, 2 layers) maps onto the teacher (width 128, 4 layers): layer 0 -> 1, 1 -> 3
    assert {k: tuple(v.shape) for k, v in aux.items()} == {
        "aux.maps.0_1.weight": (128, 64),
        "aux.maps.1_3.weight": (128, 64),
    }
    optim = torch.load(checkpoint_root(out) / "step-0000002" / "optimizer.pt", weights_only=True)
    assert {"aux.maps.0_1.weight", "model.embed_tokens.weight"} <= set(optim["state"])


def test_resume_with_a_live_teacher_equals_the_uninterrupted_run(live_run, tmp_path, monkeypatch):
    cfg, ref, ref_result = live_run
    out = tmp_path / "student"
    real = train_loop.save_checkpoint

    def save_then_stop(root, step, **kw):
        real(root, step, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_loop, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_student(cfg, student_dir=out, progress=False)
    monkeypatch.undo()
    res = train_student(cfg, student_dir=out, progress=False, resume=True)
    assert res.resumed_from_step == 2
    assert [h["loss"] for h in _history(out)] == pytest.approx([h["loss"] for h in _history(ref)], rel=1e-6)
    got, want = load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)


def test_a_live_teacher_with_no_weight_trains_exactly_like_none(generated, tmp_path):
    """The control for bench/quality.py's live rows: loading and running the teacher changes no number by itself."""
    off = train_student(_with_train(generated, max_steps=3, batch_size=8), student_dir=tmp_path / "off", progress=False)
    cfg = _with_train(generated, live_teacher=True, max_steps=3, batch_size=8)
    on = train_student(cfg, student_dir=tmp_path / "on", progress=False)
    assert on.final_loss == off.final_loss
    assert (
        load_file(str(tmp_path / "on" / "model.safetensors")).keys()
        == load_file(str(tmp_path / "off" / "model.safetensors")).keys()
    )
    for name, tensor in load_file(str(tmp_path / "on" / "model.safetensors")).items():
        assert torch.equal(tensor, load_file(str(tmp_path / "off" / "model.safetensors"))[name]), name


def test_feature_loss_falls_while_training_on_it(generated, tmp_path):
    cfg = _with_train(
        generated, live_teacher=True, feature={"weight": 1.0, "kind": "cosine"}, max_steps=8, batch_size=16
    )
    train_student(cfg, student_dir=tmp_path / "s", progress=False)
    feature = [h["feature"] for h in _history(tmp_path / "s")]
    assert feature[-1] < 0.8 * feature[0], feature


def test_live_settings_leave_the_train_key_alone_while_the_teacher_is_off(generated):
    on = _with_train(generated, **ALL)
    assert on.train_fingerprint() != generated.train_fingerprint()
    off_but_set = _with_train(generated, feature={"kind": "cosine", "layer_map": {0: 0}})
    assert off_but_set.train_fingerprint() == generated.train_fingerprint()
    other_teacher = on.model_copy(update={"teacher": on.teacher.model_copy(update={"model": "elsewhere"})})
    assert other_teacher.train_fingerprint() != on.train_fingerprint()


def test_a_family_without_the_live_teacher_is_a_config_error(generated):
    with pytest.raises(ConfigError, match=r"train.attention.weight > 0 needs train.live_teacher: true"):
        _with_train(generated, attention={"weight": 1.0})
    with pytest.raises(ConfigError, match="distance and angle both 0"):
        _with_train(generated, live_teacher=True, relation={"weight": 1.0, "distance": 0, "angle": 0})


@pytest.mark.parametrize(
    ("train", "message"),
    [
        (
            {"feature": {"weight": 1.0, "layer_map": {2: 0}}},
            "train.feature.layer_map names student layer 2, but the student has 2 decoder layers (0..1, or -1..-2)",
        ),
        (
            {"attention": {"weight": 1.0, "layer_map": {0: -5}}},
            "train.attention.layer_map names teacher layer -5, but the teacher has 4 decoder layers",
        ),
        (
            {"attention": {"weight": 1.0, "relation_heads": 3}},
            "train.attention.relation_heads=3 does not divide the query/key/value widths",
        ),
        ({"relation": {"weight": 1.0, "teacher_layer": 9}}, "train.relation.teacher_layer names teacher layer 9"),
    ],
)
def test_bad_layer_maps_are_one_line_before_training(generated, tmp_path, train, message):
    cfg = _with_train(generated, live_teacher=True, **train)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")) as err:
        train_student(cfg, student_dir=tmp_path / "s", progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "s").exists()


def test_a_live_teacher_with_another_tokenizer_stops_before_training(generated, tmp_path):
    other = model_with_another_tokenizer(tmp_path / "other")
    cfg = _with_train(generated, **ALL)
    pretrained = cfg.student.model_copy(update={"model": cfg.teacher.model, "shrink": None})  # the dataset's tokenizer
    cfg = cfg.model_copy(
        update={"student": pretrained, "teacher": cfg.teacher.model_copy(update={"model": str(other)})}
    )
    with pytest.raises(TokenizerMismatchError, match="live teacher .* has tokenizer"):
        train_student(cfg, student_dir=tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_uniform_layer_map_spaces_the_student_over_the_teacher():
    assert uniform_map(2, 4) == {0: 1, 1: 3}
    assert uniform_map(3, 12) == {0: 3, 1: 7, 2: 11}
    assert uniform_map(4, 4) == {0: 0, 1: 1, 2: 2, 3: 3}


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_recorder_reads_layers_and_projections_of_each_layout(family):
    """Separate q/k/v (Llama, Qwen, Mistral, Gemma), Phi-3's fused qkv_proj (GQA split) and GPT-2's c_attn."""
    import transformers

    configs = {
        "llama": transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        ),
        "gpt2": transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4),
        "phi3": transformers.Phi3Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
        ),
    }
    config = configs[family]
    config.vocab_size = 50
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    want = {"llama": (32, 16, 16), "gpt2": (32, 32, 32), "phi3": (32, 16, 16)}[family]
    assert qkv_widths(model) == want
    ids = torch.tensor([[1, 2, 3, 4]])
    with Recorder(model, hidden=[1], qkv=[0]) as rec:
        out = model(input_ids=ids, output_hidden_states=True)
    assert [tuple(x.shape) for x in rec.qkv[0]] == [(1, 4, w) for w in want]
    assert len(decoder_layers(model)) == 2
    # layer 1's output is the last hidden state before the final norm
    final_norm = model.transformer.ln_f if family == "gpt2" else model.model.norm
    torch.testing.assert_close(final_norm(rec.hidden[1]), out.hidden_states[-1])
    rec.hidden.clear()
    model(input_ids=ids)
    assert rec.hidden == {}, "hooks are removed when the block ends"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_with_a_live_teacher_equal_one_process(generated, tmp_path, mode):
    """Two gloo processes (grad_accum 1; the teacher replicated on each) against one process with grad_accum 2:
    the same micro-batches, so the same per-part numbers at every step, and under DDP the same weights.

    FSDP2's weights are compared with themselves across a resume, not with the one process: its reduce-scatter
    sums the gradients in another order, and AdamW moves an element whose gradient cancels to ~1e-7 by up to the
    lr either way (a fresh-clone run once failed 1e-5 on gate_proj after 3 steps); the plain FSDP2 test in
    test_train_resume.py compares the weights, and the loss parts here pin the live computation."""
    import yaml

    from tests.helpers import FSDP_ENV, TORCHRUN, train_cli

    base = _with_train(generated, **ALL, max_steps=3, batch_size=8, checkpoint_every=2, device="cpu")
    base = base.model_dump(mode="json")
    runs = {}
    for name, accum, launcher in (("one", 2, None), ("two", 1, TORCHRUN)):
        raw = {**base, "output_dir": str(tmp_path / name), "train": {**base["train"], "grad_accum": accum}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
        env = FSDP_ENV if launcher and mode == "fsdp" else None
        done = train_cli(
            tmp_path / f"{name}.yaml",
            str(generated.dataset_dir),
            **({"launcher": launcher} if launcher else {}),
            env=env,
        )
        runs[name] = tmp_path / name / "student"
        line = " ".join(done.stdout.split())  # rich wraps the line at the terminal width
        assert all(f", {part} " in line for part in ("feature", "attention", "relation")), line
    one, two = _history(runs["one"]), _history(runs["two"])
    for part in ("loss", "kd", "feature", "attention", "relation"):
        assert [h[part] for h in two] == pytest.approx([h[part] for h in one], rel=1e-5), part
    got, want = load_file(str(runs["two"] / "model.safetensors")), load_file(str(runs["one"] / "model.safetensors"))
    assert got.keys() == want.keys()
    aux = [load_file(str(checkpoint_root(r) / "step-0000002" / "aux.safetensors")) for r in runs.values()]
    assert {k: v.shape for k, v in aux[1].items()} == {k: v.shape for k, v in aux[0].items()}
    if mode == "ddp":
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        for name in aux[0]:
            torch.testing.assert_close(aux[1][name], aux[0][name], rtol=0, atol=1e-5, msg=name)
    kind = json.loads((runs["two"] / "train_log.json").read_text())["distributed"]["type"]
    assert kind == {"ddp": "MULTI_CPU", "fsdp": "FSDP"}[mode]
    if mode == "fsdp":  # resume from step 2: the projections come back from the checkpoint, the run ends the same
        (runs["two"] / "model.safetensors").unlink()
        train_cli(tmp_path / "two.yaml", str(generated.dataset_dir), launcher=TORCHRUN, env=FSDP_ENV, resume=True)
        again = load_file(str(runs["two"] / "model.safetensors"))
        for name in got:
            torch.testing.assert_close(again[name], got[name], rtol=0, atol=1e-6, msg=name)
        assert [h["feature"] for h in _history(runs["two"])] == pytest.approx([h["feature"] for h in two], rel=1e-6)


def test_gradient_checkpointing_keeps_the_live_numbers(generated, tmp_path):
    """The hooks read each layer's output in the first forward; the recomputation in backward must not disturb it."""
    cfg = _with_train(generated, **ALL, max_steps=2, batch_size=8)
    plain = train_student(cfg, student_dir=tmp_path / "plain", progress=False)
    gc = train_student(_with_train(cfg, gradient_checkpointing=True), student_dir=tmp_path / "gc", progress=False)
    assert gc.final_live == pytest.approx(plain.final_live, rel=1e-5)
    assert gc.final_loss == pytest.approx(plain.final_loss, rel=1e-5)
