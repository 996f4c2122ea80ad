"""The generate orchestrator (pipeline/generate.py) on a tiny random teacher: the plan, the manifest field by field,
what a run reports, and how it treats failing, cached, empty and lying executors.

Fast and teacher-free (no trained demo teacher), so the mutation run reaches it; tests/test_generate.py checks the
logprobs themselves against the trained demo teacher.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import generate as gen
from pipeline.config import ConfigError, build_config
from pipeline.core import path_fingerprint, stable_id
from pipeline.dataset.schema import read_manifest
from pipeline.models import load_tokenizer, tokenizer_fingerprint
from pipeline.shards import InSequence, ShardDone, ShardFailed, ShardWork, load_prompts
from tests.helpers import WORDS, tiny_llama

ROWS = 40  # embedding rows of the tiny teacher; its tokenizer has 30 tokens


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("orchestrator") / "teacher", ROWS, seed=0)


def _prompts(path: Path, count: int, *, long_from: int | None = None) -> str:
    """`count` distinct prompts of two words (six from `long_from` on), one JSON line each."""
    rng = np.random.default_rng(1)
    rows = []
    for i in range(count):
        words = [WORDS[i % len(WORDS)], WORDS[3 * i % len(WORDS)]]
        if long_from is not None and i >= long_from:
            words += list(rng.choice(WORDS, 4))
        rows.append({"prompt": " ".join(words)})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _config(teacher: Path, tmp_path: Path, *, prompts: dict | None = None, revision: str | None = None, **generate):
    raw = {
        "name": "orchestrator",
        "output_dir": str(tmp_path / "run"),
        "teacher": {"backend": "hf", "model": str(teacher), "batch_size": 16, "revision": revision},
        "prompts": prompts or {"path": _prompts(tmp_path / "prompts.jsonl", 25), "heldout_fraction": 0.2},
        "generate": {"k": 5, "max_new_tokens": 4, "shard_size": 10, "seed": 3, **generate},
        "student": {"model": str(teacher)},
    }
    return build_config(raw)


def _shard_files(dataset_dir: Path) -> list[str]:
    return sorted(f"shards/{p.name}" for p in (dataset_dir / "shards").iterdir())


# ---- the plan -------------------------------------------------------------------------------------------------


def test_the_key_follows_the_prompts_and_teacher_files_not_only_the_config(teacher, tmp_path):
    import shutil

    own = Path(shutil.copytree(teacher, tmp_path / "teacher"))
    cfg = _config(own, tmp_path)
    key = gen.generate_key(cfg)
    assert key == stable_id(cfg.generate_fingerprint(), path_fingerprint(cfg.prompts.path), path_fingerprint(str(own)))
    prompts = Path(cfg.prompts.path)
    prompts.write_text(prompts.read_text().replace("w", "w1", 1))
    edited = gen.generate_key(cfg)
    assert edited != key  # same config, other prompt text
    tiny_llama(own, ROWS, seed=1)  # the teacher retrained at the same path
    assert gen.generate_key(cfg) not in (key, edited)
    assert cfg.generate_fingerprint() == _config(own, tmp_path).generate_fingerprint()


def test_a_new_directory_plans_every_shard_from_the_prompts(teacher, tmp_path):
    cfg = _config(teacher, tmp_path)
    plan = gen.plan_dataset(cfg)
    tokenizer, prompts = load_prompts(cfg)
    assert plan.dataset_dir == cfg.dataset_dir and plan.fingerprint == gen.generate_key(cfg)
    assert (plan.num_prompts, plan.num_shards, plan.todo) == (25, 3, [0, 1, 2])  # ceil(25 / 10)
    assert plan.prompts_fingerprint == prompts.fingerprint and plan.tokenizer_fingerprint == tokenizer_fingerprint(
        tokenizer
    )
    assert plan.manifest is None and plan.dropped == [] and plan.skipped_prompts == {} and not plan.complete
    assert not cfg.dataset_dir.exists()  # planning writes nothing


def test_skipped_prompts_are_planned_and_recorded(teacher, tmp_path):
    path = _prompts(tmp_path / "p.jsonl", 12, long_from=9)
    cfg = _config(teacher, tmp_path, prompts={"path": path, "max_prompt_tokens": 4}, shard_size=4)
    plan = gen.plan_dataset(cfg)
    assert plan.skipped_prompts == load_prompts(cfg)[1].skipped and sum(plan.skipped_prompts.values()) == 3
    assert (plan.num_prompts, plan.num_shards, plan.todo) == (9, 3, [0, 1, 2])
    gen.generate_dataset(cfg, progress=False)
    m = read_manifest(cfg.dataset_dir)
    assert m.skipped_prompts == plan.skipped_prompts and m.num_prompts == 9 and m.total_samples == 9


def test_a_complete_dataset_is_planned_from_its_manifest_alone(teacher, tmp_path, monkeypatch):
    cfg = _config(teacher, tmp_path)
    gen.generate_dataset(cfg, progress=False)
    m = read_manifest(cfg.dataset_dir)

    def no_prompts(_cfg):
        raise AssertionError("a complete dataset must not load its prompts")

    monkeypatch.setattr(gen, "load_prompts", no_prompts)
    plan = gen.plan_dataset(cfg)
    assert plan.complete and plan.todo == [] and plan.dropped == []
    assert (plan.num_prompts, plan.num_shards, plan.skipped_prompts) == (25, 3, {})
    assert (plan.prompts_fingerprint, plan.tokenizer_fingerprint) == (m.prompts_fingerprint, m.tokenizer_fingerprint)
    assert plan.fingerprint == m.generate_fingerprint and plan.manifest == m


def test_an_interrupted_dataset_plans_only_its_uncommitted_shards(teacher, tmp_path):
    cfg = _config(teacher, tmp_path)
    gen.generate_dataset(cfg, progress=False)
    raw = json.loads((cfg.dataset_dir / "manifest.json").read_text())
    raw["shards"], raw["complete"] = raw["shards"][1:2], False
    (cfg.dataset_dir / "manifest.json").write_text(json.dumps(raw))
    plan = gen.plan_dataset(cfg)
    assert plan.todo == [0, 2] and plan.dropped == [] and not plan.complete
    assert [s.index for s in plan.manifest.shards] == [1]


def test_corrupted_and_missing_shards_are_dropped_from_the_plan_with_the_totals(teacher, tmp_path):
    cfg = _config(teacher, tmp_path)
    gen.generate_dataset(cfg, progress=False)
    m = read_manifest(cfg.dataset_dir)
    first = cfg.dataset_dir / m.shards[0].file
    first.write_bytes(first.read_bytes()[:-20])
    (cfg.dataset_dir / m.shards[2].file).unlink()
    plan = gen.plan_dataset(cfg)
    assert plan.dropped == [m.shards[0].file, m.shards[2].file] and plan.todo == [0, 2]
    assert not plan.manifest.complete and [s.index for s in plan.manifest.shards] == [1]
    assert plan.manifest.total_samples == m.shards[1].rows and plan.manifest.total_tokens == m.shards[1].tokens
    assert read_manifest(cfg.dataset_dir) == m  # planning writes nothing


def test_other_settings_or_another_prompt_list_are_refused_by_name(teacher, tmp_path):
    cfg = _config(teacher, tmp_path)
    gen.generate_dataset(cfg, progress=False)
    other = _config(teacher, tmp_path, k=4)
    expected = (
        f"{cfg.dataset_dir} holds a dataset made with other teacher/prompts/sampling settings "
        f"({gen.generate_key(cfg)} != {gen.generate_key(other)}); set output_dir elsewhere or delete it"
    )
    with pytest.raises(gen.DatasetMismatchError) as err:
        gen.plan_dataset(other)
    assert str(err.value) == expected
    raw = json.loads((cfg.dataset_dir / "manifest.json").read_text())
    raw["complete"], raw["num_prompts"], raw["prompts_fingerprint"] = False, 7, "feedfeedfeedfeed"
    (cfg.dataset_dir / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(gen.DatasetMismatchError) as err:
        gen.plan_dataset(cfg)
    assert str(err.value) == (
        f"{cfg.dataset_dir} was generated from another prompt list (7 prompts, feedfeedfeedfeed); resuming would "
        "mix shards: set output_dir elsewhere"
    )
    raw["num_prompts"] = 25  # the same count from another list is refused too
    (cfg.dataset_dir / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(gen.DatasetMismatchError, match="another prompt list"):
        gen.plan_dataset(cfg)


# ---- the manifest ---------------------------------------------------------------------------------------------


def test_the_manifest_records_every_setting_and_the_teachers_info(teacher, tmp_path):
    sampling = {"k": 6, "n": 2, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 3, "logprobs_dtype": "float16"}
    cfg = _config(teacher, tmp_path, revision="v1", **sampling)
    res = gen.generate_dataset(cfg, progress=False)
    m = read_manifest(cfg.dataset_dir)
    t = m.teacher
    assert (t.model, t.backend, t.revision, t.vocab_size, t.tokenizer_size) == (str(teacher), "hf", "v1", ROWS, 30)
    assert set(t.versions) >= {"transformers", "torch"}
    assert (m.k, m.logprobs_dtype, m.mode, m.completions) == (6, "float16", "sample", None)
    s = m.sampling
    assert (s.temperature, s.top_p, s.max_new_tokens, s.n, s.seed) == (0.7, 0.9, 3, 2, 3)
    assert m.prompts_source == cfg.prompts.path and m.heldout_fraction == 0.2
    tokenizer, prompts = load_prompts(cfg)
    assert m.prompts_fingerprint == prompts.fingerprint and m.tokenizer_fingerprint == tokenizer_fingerprint(tokenizer)
    assert m.generate_fingerprint == gen.generate_key(cfg) == res.generate_fingerprint
    assert m.config_hash == cfg.config_hash() and m.num_prompts == 25
    assert (m.shard_size, m.num_shards, m.skipped_prompts, m.complete) == (10, 3, {}, True)
    assert (m.total_samples, res.samples) == (50, 50)  # n = 2 per prompt
    tables = [pq.read_table(cfg.dataset_dir / s.file) for s in m.shards]
    tokens = sum(len(ids) for t in tables for ids in t["completion_token_ids"].to_pylist())
    assert m.total_tokens == res.tokens == tokens and sum(t.num_rows for t in tables) == 50
    assert str(tables[0].schema.field("topk_logprobs").type.value_type.value_type) == "halffloat"


def test_a_rescored_dataset_records_where_its_completions_came_from(teacher, tmp_path):
    path = tmp_path / "given.jsonl"
    rows = [{"prompt": "w1 w2", "answer": "w3 w4"}, {"prompt": "w5", "answer": " ".join(["w6"] * 70)}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = {"path": str(path), "completion_field": "answer", "completions_by": "a person", "overlong": "truncate"}
    cfg = _config(teacher, tmp_path, prompts=prompts, mode="rescore")
    record = gen.completions_record(cfg)
    assert (record.source, record.field, record.made_by) == (str(path), "answer", "a person")
    assert record.fingerprint == path_fingerprint(str(path)) and record.truncated == 1  # 70 words > 64 positions
    gen.generate_dataset(cfg, progress=False)
    m = read_manifest(cfg.dataset_dir)
    assert m.mode == "rescore" and m.completions == record


def test_chat_completions_are_recorded_as_the_last_turn_of_the_field(teacher, tmp_path):
    chat_teacher = tmp_path / "chat-teacher"
    tiny_llama(chat_teacher, ROWS, seed=0)
    tok = load_tokenizer(str(chat_teacher))
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}w0 {% endif %}{{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}w0 {% endif %}"
    )
    tok.save_pretrained(chat_teacher)
    path = tmp_path / "chats.jsonl"
    chat = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]
    path.write_text(json.dumps({"messages": chat}) + "\n")
    cfg = _config(
        chat_teacher, tmp_path, prompts={"path": str(path), "field": "messages", "chat_template": True}, mode="rescore"
    )
    record = gen.completions_record(cfg)
    assert (record.field, record.truncated, record.made_by) == ("messages[-1]", 0, None)


# ---- what a run does and reports ------------------------------------------------------------------------------


def test_a_run_reports_what_it_wrote_and_a_rerun_writes_nothing(teacher, tmp_path, caplog):
    cfg = _config(teacher, tmp_path)
    caplog.set_level(logging.INFO, logger="pipeline.generate")
    res = gen.generate_dataset(cfg, progress=False)
    m = read_manifest(cfg.dataset_dir)
    assert (res.dataset_dir, res.samples, res.tokens) == (str(cfg.dataset_dir), 25, m.total_tokens)
    assert res.teacher_loaded and not res.cached and (res.shards_written, res.shards_cached) == (3, 0)
    assert res.endpoints == {"in-process": 3} and 0 < res.teacher_seconds <= res.seconds < 60
    assert [s.rows for s in m.shards] == [10, 10, 5] and m.total_samples == 25
    assert _shard_files(cfg.dataset_dir) == [s.file for s in m.shards]
    committed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("committed")]
    assert committed == [
        "committed shard 1/3 (10 samples, in-process)",
        "committed shard 2/3 (10 samples, in-process)",
        "committed shard 3/3 (5 samples, in-process)",
    ]
    caplog.clear()
    again = gen.generate_dataset(cfg, progress=False)
    assert again.teacher_loaded is False and again.cached and again.shards_written == again.shards_cached == 0
    assert 0 <= again.seconds < 10
    assert (again.samples, again.tokens, again.endpoints, again.teacher_seconds) == (25, m.total_tokens, {}, 0.0)
    assert again.generate_fingerprint == res.generate_fingerprint and again.dataset_dir == res.dataset_dir
    assert [r.getMessage() for r in caplog.records] == [
        f"dataset {cfg.dataset_dir} is complete (25 samples); teacher not started"
    ]


def test_a_repair_rewrites_the_manifest_before_the_first_shard_and_says_so(teacher, tmp_path, caplog):
    cfg = _config(teacher, tmp_path)
    gen.generate_dataset(cfg, progress=False)
    good = {p: (cfg.dataset_dir / p).read_bytes() for p in _shard_files(cfg.dataset_dir)}
    (cfg.dataset_dir / "shards/part-00000.parquet").unlink()
    (cfg.dataset_dir / "shards/part-00001.parquet").unlink()
    (cfg.dataset_dir / "shards/.part-00002.parquet.tmp-9").write_bytes(b"half")
    seen, asked = [], []

    class Watching(InSequence):
        def __call__(self, cfg, work, endpoints) -> Iterator:
            asked.append(work)
            for event in super().__call__(cfg, work, endpoints):
                yield event
                on_disk = json.loads((work.dataset_dir / "manifest.json").read_text())
                seen.append(([s["index"] for s in on_disk["shards"]], on_disk["complete"]))

    caplog.set_level(logging.INFO, logger="pipeline.generate")
    res = gen.generate_dataset(cfg, progress=False, executor=Watching())
    # the missing shards left the manifest (marked incomplete) as soon as the teacher was up
    assert seen == [([2], False), ([0, 2], False), ([0, 1, 2], True)]
    assert asked == [ShardWork(cfg.dataset_dir, gen.generate_key(cfg), [0, 1])]  # the key: the flow's task cache
    assert res.shards_written == 2 and res.samples == 25
    assert {p: (cfg.dataset_dir / p).read_bytes() for p in _shard_files(cfg.dataset_dir)} == good
    messages = [r.getMessage() for r in caplog.records]
    assert (
        "2 committed shard(s) missing or corrupted (shards/part-00000.parquet, shards/part-00001.parquet); "
        "they will be generated again" in messages
    )
    assert "removed 1 uncommitted file(s) left by an interrupted run" in messages


def test_cached_shards_are_counted_apart_from_the_teachers_work(teacher, tmp_path, caplog):
    cfg = _config(teacher, tmp_path)
    cfg.dataset_dir.mkdir(parents=True)  # an empty directory made beforehand is used as it is
    ran = []

    class HalfCached(InSequence):
        def __call__(self, cfg, work, endpoints):
            for event in super().__call__(cfg, work, endpoints):
                if isinstance(event, ShardDone) and event.index != 1:
                    event = event.model_copy(update={"cached": True, "seconds": 100.0})
                elif isinstance(event, ShardDone):
                    ran.append(event.seconds)
                yield event

    caplog.set_level(logging.INFO, logger="pipeline.generate")
    res = gen.generate_dataset(cfg, progress=False, executor=HalfCached())
    assert (res.shards_written, res.shards_cached, res.endpoints) == (1, 2, {"in-process": 1})
    assert res.teacher_seconds == ran[0] and res.teacher_loaded and not res.cached
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("committed")] == [
        "committed shard 1/3 (10 samples, cached)",
        "committed shard 2/3 (10 samples, in-process)",
        "committed shard 3/3 (5 samples, cached)",
    ]


def test_a_failed_shard_keeps_the_others_committed_and_raises_its_error(teacher, tmp_path, caplog):
    cfg = _config(teacher, tmp_path)
    first, second = OSError("disk gone"), ValueError("second")

    class Failing(InSequence):
        def __call__(self, cfg, work, endpoints):
            for event in super().__call__(cfg, work, endpoints):
                if isinstance(event, ShardDone) and event.index in (0, 2):
                    yield ShardFailed(event.index, first if event.index == 0 else second)
                else:
                    yield event

    with pytest.raises(OSError) as err:
        gen.generate_dataset(cfg, progress=False, executor=Failing())
    assert err.value is first
    m = read_manifest(cfg.dataset_dir)
    assert [s.index for s in m.shards] == [1] and not m.complete and m.total_samples == 10
    assert "shard 0 failed: disk gone" in [r.getMessage() for r in caplog.records]
    res = gen.generate_dataset(cfg, progress=False)  # the rerun writes only the two failed shards
    assert res.shards_written == 2 and read_manifest(cfg.dataset_dir).complete


def test_an_executor_that_yields_nothing_or_lies_is_an_error(teacher, tmp_path):
    cfg = _config(teacher, tmp_path)

    class Nothing(InSequence):
        def __call__(self, cfg, work, endpoints):
            return iter(())

    with pytest.raises(RuntimeError, match="^the shard executor finished without a teacher or a shard$"):
        gen.generate_dataset(cfg, progress=False, executor=Nothing())
    assert not cfg.dataset_dir.exists()

    class Lying(InSequence):
        def __call__(self, cfg, work, endpoints):
            for event in super().__call__(cfg, work, endpoints):
                if isinstance(event, ShardDone):
                    event = event.model_copy(update={"shard": event.shard.model_copy(update={"sha256": "0" * 64})})
                yield event

    with pytest.raises(RuntimeError, match=r"^shard 0's file does not match the record its executor returned$"):
        gen.generate_dataset(cfg, progress=False, executor=Lying())
    assert read_manifest(cfg.dataset_dir).shards == []  # nothing committed from a file that is not what it says


def test_a_k_beyond_the_teachers_vocabulary_stops_before_anything_is_written(teacher, tmp_path):
    cfg = _config(teacher, tmp_path, k=ROWS + 1)
    with pytest.raises(ConfigError, match=f"generate.k={ROWS + 1} is larger than the teacher's vocabulary"):
        gen.generate_dataset(cfg, progress=False)
    assert not cfg.dataset_dir.exists()
    assert gen.generate_dataset(_config(teacher, tmp_path, k=ROWS), progress=False).samples == 25


def test_one_managed_server_unless_the_executor_runs_shards_in_parallel(teacher, tmp_path, monkeypatch):
    asked = []
    real = gen.teacher_endpoints

    def recording(cfg, *, max_servers):
        asked.append(max_servers)
        return real(cfg, max_servers=max_servers)

    monkeypatch.setattr(gen, "teacher_endpoints", recording)

    class Parallel(InSequence):
        parallel = True

    gen.generate_dataset(_config(teacher, tmp_path / "a"), progress=False)
    gen.generate_dataset(_config(teacher, tmp_path / "b"), progress=False, executor=Parallel())
    assert asked == [1, None]


def test_progress_counts_prompts_from_the_committed_shards_on(teacher, tmp_path, monkeypatch):
    cfg = _config(teacher, tmp_path)
    gen.generate_dataset(cfg, progress=False)
    raw = json.loads((cfg.dataset_dir / "manifest.json").read_text())
    raw["shards"], raw["complete"] = raw["shards"][:1], False
    (cfg.dataset_dir / "manifest.json").write_text(json.dumps(raw))
    calls = []

    @contextmanager
    def recording(name, total, *, enabled):
        calls.append(("open", name, total, enabled))
        yield lambda n, info=None: calls.append((n, info))

    monkeypatch.setattr(gen, "progress_bar", recording)
    gen.generate_dataset(cfg, progress=False)
    assert calls == [("open", "generate", 25, False), (10, None), (10, "shard 2/3"), (5, "shard 3/3")]
    calls.clear()
    gen.generate_dataset(_config(teacher, tmp_path / "fresh"))  # progress is shown unless asked not to
    assert calls == [("open", "generate", 25, True), (0, None), (10, "shard 1/3"), (10, "shard 2/3"), (5, "shard 3/3")]
