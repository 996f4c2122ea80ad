"""pipeline/prompts.py: prompts from JSONL, Parquet and `datasets` directories, chat templates, and skips."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import PromptsConfig
from pipeline.core import stable_id
from pipeline.models import load_tokenizer
from pipeline.prompts import PromptsError, load_prompt_set, read_prompts


@pytest.fixture(scope="module")
def tok(tiny_teacher):
    return load_tokenizer(str(tiny_teacher))


def test_the_three_sources_read_the_same_prompts(tmp_path):
    items = ["pick a: x y", "pick b: z"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": p}) for p in items) + "\n\n")
    pq.write_table(pa.table({"prompt": items}), tmp_path / "p.parquet")
    import datasets

    datasets.Dataset.from_dict({"text": items}).save_to_disk(str(tmp_path / "hf"))
    assert read_prompts(PromptsConfig(path=str(jsonl))) == items
    assert read_prompts(PromptsConfig(path=str(tmp_path / "p.parquet"))) == items
    assert read_prompts(PromptsConfig(path=str(tmp_path / "hf"), field="text")) == items
    assert read_prompts(PromptsConfig(path=str(jsonl), limit=1)) == items[:1]
    with pytest.raises(PromptsError, match="no column 'prompt'"):
        read_prompts(PromptsConfig(path=str(tmp_path / "hf")))


def test_ids_skips_and_fingerprint(tok, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in ["pick a", "", "pick a", "pick " + "a " * 200]))
    ps = load_prompt_set(PromptsConfig(path=str(path), max_prompt_tokens=50), tok)
    assert ps.texts == ["pick a"] and ps.ids == [stable_id("pick a")]
    assert ps.skipped == {"empty": 1, "too_long": 1, "duplicate": 1}
    assert ps.token_ids[0] == tok("pick a")["input_ids"]
    with pytest.raises(PromptsError, match="prompt 2 is empty"):
        load_prompt_set(PromptsConfig(path=str(path), on_invalid="fail"), tok)


def test_chat_messages_need_the_chat_template(tok, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "pick a"}]}) + "\n")
    with pytest.raises(PromptsError, match="chat_template is false"):
        load_prompt_set(PromptsConfig(path=str(path)), tok)
