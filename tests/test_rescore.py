"""Re-score mode (`generate.mode: rescore`): given completions read, tokenized and scored by the teacher.

The strongest check is parity: re-scoring a sampled dataset's own completions gives back its stored top-k.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import PromptsConfig, build_config
from pipeline.dataset.schema import read_manifest
from pipeline.dataset.stream import TrainStream
from pipeline.generate import generate_dataset, generate_key
from pipeline.models import load_tokenizer
from pipeline.prompts import PromptsError, load_prompt_set
from tests.conftest import raw_config

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def tok(tiny_teacher):
    return load_tokenizer(str(tiny_teacher))


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _rescore(path: str, **kw) -> PromptsConfig:
    return PromptsConfig(path=path, **kw)


def test_text_completions_are_tokenized_apart_from_the_prompt_and_end_with_eos(tok, tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "pick: a b =", "completion": " a 1 ; b 1"}])
    ps = load_prompt_set(_rescore(path), tok, rescore=True)
    (given,) = ps.completions[0]
    assert ps.token_ids[0] == tok("pick: a b =")["input_ids"]
    assert given.token_ids == tok(" a 1 ; b 1", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert not given.truncated
    no_eos = load_prompt_set(_rescore(path, append_eos=False), tok, rescore=True)
    assert no_eos.completions[0][0].token_ids == given.token_ids[:-1]


def test_token_id_completions_are_kept_and_rows_of_one_prompt_are_grouped(tok, tmp_path):
    rows = [
        {"prompt": "pick: a =", "completion": [5, 6, 7]},
        {"prompt": "pick: b =", "completion": [8]},
        {"prompt": "pick: a =", "completion": [9, 10]},
        {"prompt": "pick: a =", "completion": [5, 6, 7]},  # the same sample again: skipped
    ]
    ps = load_prompt_set(_rescore(_jsonl(tmp_path / "p.jsonl", rows)), tok, rescore=True)
    assert ps.texts == ["pick: a =", "pick: b ="]
    assert [[c.token_ids for c in cs] for cs in ps.completions] == [[[5, 6, 7], [9, 10]], [[8]]]
    assert ps.skipped == {"duplicate": 1}
    other = load_prompt_set(_rescore(_jsonl(tmp_path / "q.jsonl", rows[:3])), tok, rescore=True)
    assert other.fingerprint == ps.fingerprint
    changed = load_prompt_set(
        _rescore(_jsonl(tmp_path / "r.jsonl", [*rows[:2], {"prompt": "pick: a =", "completion": [9, 11]}])),
        tok,
        rescore=True,
    )
    assert changed.fingerprint != ps.fingerprint, "the completions are part of the prompt set's identity"


def test_chat_messages_split_at_the_last_assistant_turn(tiny_teacher, tmp_path):
    tok = load_tokenizer(str(tiny_teacher))  # a copy of its own: the chat template is set on it
    tok.chat_template = CHAT_TEMPLATE
    chat = [
        {"role": "user", "content": "pick: a b ="},
        {"role": "assistant", "content": "a 1 ; b 1"},
    ]
    import datasets

    datasets.Dataset.from_dict({"messages": [chat]}).save_to_disk(str(tmp_path / "chat"))
    ps = load_prompt_set(_rescore(str(tmp_path / "chat"), field="messages", chat_template=True), tok, rescore=True)
    prompt = tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert ps.texts == [prompt] and ps.chat
    assert ps.token_ids[0] == tok(prompt, add_special_tokens=False)["input_ids"]
    assert ps.token_ids[0].count(tok.bos_token_id) == 1, "the template's BOS, not a second one"
    completion = ps.completions[0][0].token_ids
    assert completion == tok(" a 1 ; b 1" + tok.eos_token, add_special_tokens=False)["input_ids"]
    assert completion[-1] == tok.eos_token_id, "the template's end of turn ends the completion (no EOS added)"
    with pytest.raises(PromptsError, match="row 1: .*do not end with an assistant turn"):
        datasets.Dataset.from_dict({"messages": [chat[:1]]}).save_to_disk(str(tmp_path / "open"))
        load_prompt_set(_rescore(str(tmp_path / "open"), field="messages", chat_template=True), tok, rescore=True)


def test_empty_and_overlong_completions_are_skipped_counted_or_truncated(tok, tmp_path):
    long = list(range(5, 45))
    rows = [
        {"prompt": "pick: a =", "completion": ""},
        {"prompt": "pick: b =", "completion": long},
        {"prompt": "pick: c =", "completion": [5, 6]},
    ]
    path = _jsonl(tmp_path / "p.jsonl", rows)
    limit = len(tok("pick: b =")["input_ids"]) + 10
    ps = load_prompt_set(_rescore(path), tok, rescore=True, max_tokens=limit)
    assert ps.texts == ["pick: c ="] and ps.skipped == {"empty_completion": 1, "too_long": 1}
    cut = load_prompt_set(_rescore(path, overlong="truncate"), tok, rescore=True, max_tokens=limit)
    assert [[c.token_ids for c in cs] for cs in cut.completions] == [[long[:10]], [[5, 6]]]
    assert cut.completions[0][0].truncated and cut.truncated == 1
    with pytest.raises(PromptsError, match="prompt 1 is given an empty completion"):
        load_prompt_set(_rescore(path, on_invalid="fail"), tok, rescore=True, max_tokens=limit)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "pick: a ="}, "row 1: it has no 'completion'"),
        ({"prompt": "pick: a =", "completion": [1, 10**6]}, "outside the teacher tokenizer"),
        ({"prompt": "pick: a =", "completion": {"text": "x"}}, "a completion is a dict"),
    ],
)
def test_bad_completions_are_one_line_errors(tok, tmp_path, row, message):
    with pytest.raises(PromptsError, match=message) as err:
        load_prompt_set(_rescore(_jsonl(tmp_path / "p.jsonl", [row])), tok, rescore=True)
    assert "\n" not in str(err.value)


def test_parquet_source_with_a_completion_column(tok, tmp_path):
    pq.write_table(pa.table({"text": ["pick: a ="], "answer": [" a 1"]}), tmp_path / "p.parquet")
    cfg = _rescore(str(tmp_path / "p.parquet"), field="text", completion_field="answer")
    ps = load_prompt_set(cfg, tok, rescore=True)
    assert ps.completions[0][0].token_ids == tok(" a 1", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def _pairs_file(dataset_dir, path) -> str:
    """The sampled dataset's (prompt, completion token ids) as a re-score source."""
    rows = read_rows_table(dataset_dir)
    return _jsonl(path, [{"prompt": r["prompt"], "completion": r["completion_token_ids"]} for r in rows])


def read_rows_table(dataset_dir) -> list[dict]:
    manifest = read_manifest(dataset_dir)
    return [r for s in manifest.shards for r in pq.read_table(dataset_dir / s.file).to_pylist()]


def test_rescoring_sampled_completions_gives_back_their_topk_hf(generated, tiny_teacher, tmp_path):
    """Parity: the transformers teacher forced through its own samples reproduces what it logged while sampling."""
    source = _pairs_file(generated.dataset_dir, tmp_path / "pairs.jsonl")
    raw = raw_config(tiny_teacher, source, tmp_path / "rescore", generate={"mode": "rescore"})
    raw["prompts"]["path"] = source
    cfg = build_config(raw)
    generate_dataset(cfg, progress=False)
    sampled = {r["sample_id"]: r for r in read_rows_table(generated.dataset_dir)}
    scored = {r["sample_id"]: r for r in read_rows_table(cfg.dataset_dir)}
    assert scored.keys() == sampled.keys(), "same prompt ids and completion order give the same sample ids"
    # both are stored on the logprob grid: a value next to a grid boundary may round one step apart
    tol = 2e-4 + 2 * read_manifest(cfg.dataset_dir).storage.max_logprob_error
    for sid, s in sampled.items():
        r = scored[sid]
        assert r["completion_token_ids"] == s["completion_token_ids"] and r["finish_reason"] == "given"
        assert r["topk_token_ids"] == s["topk_token_ids"]
        np.testing.assert_allclose(r["topk_logprobs"], s["topk_logprobs"], atol=tol)
        np.testing.assert_allclose(r["token_logprobs"], s["token_logprobs"], atol=tol)
    m = read_manifest(cfg.dataset_dir)
    assert m.mode == "rescore" and m.completions.source == source and m.completions.field == "completion"
    assert m.total_samples == len(sampled)


def test_the_mode_and_the_completions_key_the_dataset(make_config, tmp_path):
    base = make_config()
    rescore = make_config(generate={"mode": "rescore"})
    other_field = make_config(generate={"mode": "rescore"}, prompts={"completion_field": "answer"})
    keys = {generate_key(c) for c in (base, rescore, other_field)}
    assert len(keys) == 3


def test_mixed_datasets_train_together_and_must_share_tokenizer_and_k(generated, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(generated.dataset_dir, other)
    alone = TrainStream(generated.dataset_dir, batch_size=8, pad_id=0)
    mixed = TrainStream(generated.dataset_dir, batch_size=8, pad_id=0, mix=[(other, 2)])
    assert mixed.num_samples == 3 * alone.num_samples
    epoch = [b for _, b in zip(range(mixed.batches_per_epoch), mixed.batches())]
    assert sum(len(b.input_ids) for b in epoch) == mixed.num_samples
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["k"] += 1
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="cannot be mixed into .*another tokenizer or k"):
        TrainStream(generated.dataset_dir, batch_size=8, pad_id=0, mix=[(other, 1)])


def test_rescore_with_n_samples_is_a_config_error(make_config):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="'generate': generate.n samples completions; rescore"):
        make_config(generate={"mode": "rescore", "n": 4})
