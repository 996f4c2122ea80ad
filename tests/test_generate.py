"""The generate stage: teacher logprobs are the model's raw log-softmax, and runs resume exactly."""

import json

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.core import sha256_file
from pipeline.dataset.schema import read_manifest
from pipeline.dataset.validate import validate_dataset
from pipeline.generate import DatasetMismatchError, generate_dataset, generate_key
from pipeline.models import load_causal_lm
from pipeline.shards import InSequence
from pipeline.teachers.hf import HFTeacher
from tests.helpers import read_rows


def test_logprobs_match_a_teacher_forced_forward_pass(generated):
    """The cached top-k and sampled-token logprobs equal log_softmax of a plain forward pass (T=1, raw)."""
    model = load_causal_lm(generated.teacher.model)
    s = read_rows(generated.dataset_dir)
    tol = 2e-4 + read_manifest(generated.dataset_dir).storage.max_logprob_error  # stored on a grid (schema.py)
    for i in range(8):
        seq = np.concatenate([s.prompt_tokens[i], s.completion_tokens[i]])
        with torch.no_grad():
            logp = model(torch.tensor(seq[None])).logits[0].float().log_softmax(-1)
        p = len(s.prompt_tokens[i])
        rows = logp[p - 1 : p - 1 + len(s.completion_tokens[i])]
        ref_lp, ref_ids = rows.topk(8, dim=-1)
        np.testing.assert_allclose(s.topk_logprobs[i], ref_lp.numpy(), atol=tol)
        assert (s.topk_ids[i] == ref_ids.numpy()).mean() > 0.99  # ties may swap order
        tok = torch.from_numpy(s.completion_tokens[i].astype(np.int64))
        np.testing.assert_allclose(s.token_logprobs[i], rows.gather(1, tok[:, None])[:, 0].numpy(), atol=tol)


def test_stops_on_eos_and_records_finish_reason(generated):
    s = read_rows(generated.dataset_dir)
    import pyarrow.parquet as pq

    reasons = pq.read_table(generated.dataset_dir / "shards/part-00000.parquet")["finish_reason"].to_pylist()
    eos = HFTeacher(generated.teacher).info.eos_token_ids
    for tokens, reason in zip(s.completion_tokens, reasons):
        assert reason in ("stop", "length")
        if reason == "stop":
            assert tokens[-1] in eos and not np.isin(tokens[:-1], eos).any()
        else:
            assert len(tokens) == generated.generate.max_new_tokens


def test_complete_dataset_does_not_load_the_teacher(generated):
    def no_teacher(_cfg, _endpoint):
        raise AssertionError("the teacher must not be loaded for a complete dataset")

    res = generate_dataset(generated, progress=False, executor=InSequence(open_teacher=no_teacher))
    assert not res.teacher_loaded and res.shards_written == 0 and res.samples == 96


def test_resume_rewrites_only_missing_shards_identically(generated, make_config, tmp_path):
    import shutil

    cfg = make_config(out=tmp_path / "resume")
    shutil.copytree(generated.dataset_dir, cfg.dataset_dir)
    before = {p.name: sha256_file(p) for p in (cfg.dataset_dir / "shards").iterdir()}
    raw = json.loads((cfg.dataset_dir / "manifest.json").read_text())
    raw["shards"] = raw["shards"][:1]  # as if killed after the first commit; later shards are stray files
    raw["complete"] = False
    (cfg.dataset_dir / "manifest.json").write_text(json.dumps(raw))
    (cfg.dataset_dir / "shards/.part-00001.parquet.tmp-123").write_bytes(b"half a shard")
    res = generate_dataset(cfg, progress=False)
    assert res.shards_written == 2 and res.teacher_loaded
    after = {p.name: sha256_file(p) for p in (cfg.dataset_dir / "shards").iterdir()}
    assert after == before  # same seeds per shard: byte-identical, no temp files left
    assert validate_dataset(cfg.dataset_dir).samples == 96
    assert len(set(read_rows(cfg.dataset_dir).prompt_ids)) == 96


def test_other_settings_refuse_to_mix_into_a_dataset(generated, make_config, tmp_path):
    import shutil

    cfg = make_config(out=tmp_path / "mix", generate={"k": 4})
    shutil.copytree(generated.dataset_dir, cfg.dataset_dir)
    with pytest.raises(DatasetMismatchError, match="other teacher/prompts/sampling settings"):
        generate_dataset(cfg, progress=False)


def test_manifest_records_how_it_was_made(generated):
    m = read_manifest(generated.dataset_dir)
    assert m.teacher.backend == "hf" and "transformers" in m.teacher.versions
    assert m.sampling.temperature == 1.0 and m.sampling.n == 1 and m.k == 8
    assert m.heldout_fraction == 0.25 and len(m.tokenizer_fingerprint) == 16
    assert all(len(s.sha256) == 64 for s in m.shards)


def test_corrupted_or_missing_committed_shards_are_regenerated(generated, make_config, tmp_path):
    import shutil

    cfg = make_config(out=tmp_path / "repair")
    shutil.copytree(generated.dataset_dir, cfg.dataset_dir)
    good = {p.name: sha256_file(p) for p in (cfg.dataset_dir / "shards").iterdir()}
    shard = cfg.dataset_dir / "shards/part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-50])
    (cfg.dataset_dir / "shards/part-00002.parquet").unlink()
    res = generate_dataset(cfg, progress=False)
    assert res.shards_written == 2 and res.teacher_loaded
    assert {p.name: sha256_file(p) for p in (cfg.dataset_dir / "shards").iterdir()} == good
    assert validate_dataset(cfg.dataset_dir).complete


def test_endpoints_and_server_count_stay_out_of_the_cache_key(make_config, tiny_teacher):
    base = {"backend": "vllm_server", "model": str(tiny_teacher)}
    one = make_config(teacher=base)
    two = make_config(teacher={**base, "urls": ["http://a:8000", "http://b:8000/"]})
    managed = make_config(teacher={**base, "num_servers": 3})
    assert generate_key(one) == generate_key(two) == generate_key(managed)
    assert two.teacher.endpoints() == ["http://a:8000", "http://b:8000"] and managed.teacher.endpoints() == []
    with pytest.raises(ConfigError, match="not both"):
        make_config(teacher={**base, "url": "http://a:8000", "urls": ["http://b:8000"]})
    with pytest.raises(ConfigError, match="num_servers"):
        make_config(teacher={**base, "urls": ["http://a:8000"], "num_servers": 2})
