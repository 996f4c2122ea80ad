"""Held-out evaluation: metrics of teacher and student, the LM head in training's chunks, and the uncertain /
deterministic split on the same teacher entropy `distill inspect` shows."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import pipeline.evaluate as evaluate_mod
from pipeline.dataset.schema import Generation, build_table
from pipeline.dataset.stats import summarize, topk_entropy
from pipeline.dataset.stream import TrainStream
from pipeline.dataset.views import sample_view
from pipeline.dataset.writer import commit_shard, write_manifest, write_shard
from pipeline.evaluate import UNCERTAIN_NATS, evaluate, position_metrics, summarize_positions
from pipeline.train import train_student
from tests.helpers import tiny_manifest


def test_eval_reports_teacher_and_student(generated, tmp_path, monkeypatch):
    chunk_sizes = []
    real = evaluate_mod.map_head_chunks

    def spy(*args, chunk_size, **kw):
        chunk_sizes.append(chunk_size)
        return real(*args, chunk_size=chunk_size, **kw)

    monkeypatch.setattr(evaluate_mod, "map_head_chunks", spy)
    train_student(generated, student_dir=tmp_path / "student", progress=False)
    m = evaluate(generated, student_dir=tmp_path / "student", metrics_path=tmp_path / "metrics.json")
    assert m["split"] == "heldout" and 0 < m["heldout_prompts"] <= 16
    assert m["student"]["kl"] > 0 and 0 <= m["student"]["top1_agreement"] <= 1
    assert 0 <= m["student"]["accuracy"] <= 1 and 0 <= m["teacher"]["accuracy"] <= 1
    assert m["teacher"]["ce"] > 0 and m["student"]["positions"] > 0
    # mass on the teacher's top-k: KL(p~ || q) >= -log(sum of q over the top-k) per position, then Jensen over positions
    s, t = m["student"], m["teacher"]
    assert 0 < s["topk_mass"] < 1 and s["kl"] >= -math.log(s["topk_mass"]) - 1e-9
    assert math.exp(-t["kl"]) - 1e-9 <= t["topk_mass"] <= 1 + 1e-3  # the teacher's floor is -log of its own mass
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["student"]["kl"] == pytest.approx(m["student"]["kl"])
    assert (tmp_path / "student/metrics.json").is_file()
    # the LM head ran in training's chunks (train.loss_chunk_size), not a size of its own
    assert chunk_sizes and set(chunk_sizes) == {generated.train.loss_chunk_size}


# k = 2; per position the teacher's top-2 probabilities and their entropy over k+1 buckets (top-2 + tail):
KNOWN = [
    ([0.5, 0.25], 1.5 * math.log(2)),  # tail 0.25: -(0.5 ln 0.5 + 2 * 0.25 ln 0.25) = 1.0397, uncertain
    # tail 0.1: 0.325 nats, uncertain; renormalised over the top-2 it would be ~1e-5 (deterministic)
    ([0.9, 1e-6], -(0.9 * math.log(0.9) + 1e-6 * math.log(1e-6) + (0.1 - 1e-6) * math.log(0.1 - 1e-6))),
    ([0.999, 0.0005], -(0.999 * math.log(0.999) + 2 * 0.0005 * math.log(0.0005))),  # 0.0086 nats, deterministic
]


def _write_known(path):
    """One sample whose three positions have the teacher distributions of KNOWN (logprobs on the storage grid)."""
    manifest = tiny_manifest(
        k=2, vocab=8, sampling={"max_new_tokens": 3, "n": 1}, prompts_source="hand", num_prompts=1, shard_size=1
    )
    path.mkdir(parents=True)
    write_manifest(path, manifest)
    lp = np.round(np.log(np.array([p for p, _ in KNOWN])) * 128) / 128
    gen = Generation(
        completion_token_ids=np.array([1, 3, 5], np.int32),
        token_logprobs=lp[:, 0].astype(np.float32),
        topk_token_ids=np.array([[1, 2], [3, 4], [5, 6]], np.int32),
        topk_logprobs=lp.astype(np.float32),
        finish_reason="length",
    )
    table = build_table(
        prompt_ids=["p0"], prompts=["p"], prompt_token_ids=[[7]], generations=[[gen]], completions=[["c"]], seed=0
    )
    commit_shard(path, manifest, write_shard(path, 0, table, prompts=1, heldout_fraction=0.0))
    return path


class _Trunk(torch.nn.Module):
    def __init__(self, vocab: int, d: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(last_hidden_state=self.embed(input_ids))


class _Student(torch.nn.Module):
    """The smallest model `position_metrics` runs: a trunk under `base_model_prefix` and an LM head."""

    base_model_prefix = "model"

    def __init__(self, vocab: int = 8, d: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.model, self.head = _Trunk(vocab, d), torch.nn.Linear(d, vocab)

    def get_output_embeddings(self):
        return self.head


def test_uncertain_split_uses_the_entropy_distill_inspect_shows(tmp_path):
    ds = _write_known(tmp_path / "known")
    batch, _ = next(TrainStream(ds, split="all", batch_size=8, pad_id=0).in_order())
    per_position = position_metrics(_Student(), batch, chunk_size=2)
    entropy = per_position["entropy"].double().numpy()
    # the known answers (up to the 2^-7 storage grid of the logprobs)
    np.testing.assert_allclose(entropy, [h for _, h in KNOWN], atol=0.02)
    # exactly what `distill inspect` shows, per token and on average
    assert entropy.tolist() == [t.entropy for t in sample_view(ds, 0).tokens]
    assert summarize(ds).entropy.mean == pytest.approx(entropy.mean(), rel=1e-6)
    assert entropy.tolist() == topk_entropy(batch.topk_logprobs.numpy()).tolist()
    # the split: the first two positions are uncertain (the second only with the tail bucket), the third is not
    metrics = summarize_positions([per_position])
    kl = per_position["kl"].double()
    assert (entropy > UNCERTAIN_NATS).tolist() == [True, True, False]
    assert metrics["uncertain_positions"] == 2 and metrics["positions"] == 3
    assert metrics["kl_uncertain"] == pytest.approx(float(kl[:2].mean()))
    assert metrics["kl_deterministic"] == pytest.approx(float(kl[2]))


def test_head_chunk_size_changes_nothing_but_memory(tmp_path):
    ds = _write_known(tmp_path / "known")
    batch, _ = next(TrainStream(ds, split="all", batch_size=8, pad_id=0).in_order())
    one, whole = (summarize_positions([position_metrics(_Student(), batch, chunk_size=c)]) for c in (1, 1024))
    assert one == pytest.approx(whole, rel=1e-6)


def test_input_ids_beyond_a_smaller_student_are_read_as_its_pad_token():
    """A sampled id from a larger teacher's padding rows has no row in the student: evaluation feeds the student's
    pad id in its place (what training does), not id 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.dataset.batch import Batch

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=10, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=16, pad_token_id=5,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()

    def batch(ids: list[int]) -> Batch:
        n = len(ids) - 1
        return Batch(
            torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), torch.tensor([[True] * n + [False]]),
            torch.tensor(ids[1:]), torch.tensor([[1, 2]] * n), torch.log(torch.tensor([[0.6, 0.3]] * n)),
        )  # fmt: skip

    got = position_metrics(model, batch([3, 12, 4, 7]), chunk_size=64)  # 12: beyond the student's 10 rows
    as_pad = position_metrics(model, batch([3, 5, 4, 7]), chunk_size=64)
    as_zero = position_metrics(model, batch([3, 0, 4, 7]), chunk_size=64)
    assert torch.equal(got["kl"][1:], as_pad["kl"][1:]) and not torch.equal(got["kl"][1:], as_zero["kl"][1:])


def test_a_completion_that_ends_is_scored_without_its_special_tokens(tmp_path):
    """A student that stops at once (its head scores every id 0, so greedy picks id 0, its EOS) answers with an empty
    text: EOS and the pads after it are not part of the completion the checker sees."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from pipeline.evaluate import sample_accuracy

    vocab = {t: i for i, t in enumerate(["<eos>", "<bos>", "<pad>", "a", "b", "c"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    config = LlamaConfig(
        vocab_size=6, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, head_dim=4, max_position_embeddings=16, eos_token_id=0, pad_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    prompts = ["a b", "c"]
    tokens = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    kw = {"temperature": 0.0, "max_new_tokens": 4, "batch_size": 2, "seed": 0, "device": torch.device("cpu")}
    assert sample_accuracy(model, tok, prompts, tokens, lambda _p, completion: completion == "", **kw) == 1.0
