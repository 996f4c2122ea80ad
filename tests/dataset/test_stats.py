"""`distill inspect`: summary numbers on a hand-built dataset, consistency on a generated one, the CLI, and the
HTML report opened in a real headless Chromium."""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.dataset.report import render_report
from pipeline.dataset.schema import (
    DatasetError,
    Generation,
    build_table,
    read_manifest,
)
from pipeline.dataset.stats import DatasetSummary, summarize
from pipeline.dataset.summary_text import summary_rows
from pipeline.dataset.views import sample_view
from pipeline.dataset.writer import commit_shard, write_manifest, write_shard
from tests.helpers import one_line_error, read_rows, tiny_manifest

runner = CliRunner()
CHROMIUM = "/usr/bin/chromium"

# Two samples (one per shard), k=3. Per position: top-3 probabilities (sorted), top-3 ids, sampled id.
POSITIONS = [
    ([0.5, 0.3, 0.12], [1, 2, 3], 2),  # sample 0, t=0: coverage 0.92, sampled at rank 2
    ([0.992, 0.003, 0.001], [4, 5, 6], 4),  # sample 0, t=1: near one-hot, rank 1
    ([0.45, 0.3, 0.22], [7, 8, 9], 0),  # sample 1, t=0: coverage 0.97, sampled outside the top-3 (p=0.01)
]
SAMPLED_P = [0.3, 0.992, 0.01]


def _on_grid(p) -> np.ndarray:
    """log(p) snapped to multiples of 2^-7 (the writer's storage grid, exact in float16), so storage changes nothing."""
    return np.round(np.log(np.asarray(p, np.float64)) * 128) / 128


TOPK_P = [np.exp(_on_grid(p)) for p, _, _ in POSITIONS]  # the probabilities as stored: [0.4989, 0.3003, 0.1204], ...


def _generation(rows: list[int], finish: str) -> Generation:
    return Generation(
        completion_token_ids=np.array([POSITIONS[r][2] for r in rows], np.int32),
        token_logprobs=_on_grid([SAMPLED_P[r] for r in rows]).astype(np.float32),
        topk_token_ids=np.array([POSITIONS[r][1] for r in rows], np.int32),
        topk_logprobs=_on_grid([POSITIONS[r][0] for r in rows]).astype(np.float32),
        finish_reason=finish,
    )


def _write_hand_dataset(path: Path, dtype: str = "float32") -> Path:
    manifest = tiny_manifest(
        num_shards=2,
        k=3,
        vocab=10,
        teacher_model=str(path / "no-such-teacher"),
        logprobs_dtype=dtype,
        sampling={"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 4, "n": 1, "seed": 7},
        prompts_source="hand",
        num_prompts=2,
        shard_size=1,
    )
    path.mkdir(parents=True)
    write_manifest(path, manifest)
    for index, (rows, finish) in enumerate([([0, 1], "stop"), ([2], "length")]):
        table = build_table(
            prompt_ids=[f"p{index}"],
            prompts=[f"prompt {index}"],
            prompt_token_ids=[[1, 2]],
            generations=[[_generation(rows, finish)]],
            completions=[["c"]],
            seed=0,
            logprobs_dtype=dtype,
        )
        manifest = commit_shard(
            path, manifest, write_shard(path, index, table, prompts=1, heldout_fraction=manifest.heldout_fraction)
        )
    return path


@pytest.fixture
def hand(tmp_path) -> Path:
    return _write_hand_dataset(tmp_path / "hand")


def _reference_entropy(p: np.ndarray) -> float:
    q = np.append(p, 1.0 - p.sum())
    return float(-(q * np.log(q)).sum())


def test_hand_computed_numbers(hand):
    s = summarize(hand, batch_rows=1)
    assert (s.samples, s.prompts, s.tokens, s.k, s.shards, s.complete) == (2, 2, 3, 3, 2, True)
    assert s.finish_reasons == {"length": 1, "stop": 1}
    assert (s.length.min, s.length.max, s.length.counts) == (1, 2, [0, 1, 1])
    assert s.coverage.mean == pytest.approx(np.mean([p.sum() for p in TOPK_P]), abs=1e-6)
    assert s.top1.mean == pytest.approx(np.mean([p[0] for p in TOPK_P]), abs=1e-6)
    assert s.entropy.mean == pytest.approx(np.mean([_reference_entropy(p) for p in TOPK_P]), abs=1e-5)
    assert s.near_one_hot == pytest.approx(1 / 3)
    assert s.coverage_curve == pytest.approx(np.mean([np.cumsum(p) for p in TOPK_P], axis=0), abs=1e-6)
    # top-j mass per position: [0.499, 0.799, 0.920], [0.992, 0.995, 0.996], [0.451, 0.751, 0.971]
    # counts for j = 1, 2, 3 candidates, then ">3"
    assert s.k_needed == {"0.9": [1, 0, 2, 0], "0.95": [1, 0, 1, 1], "0.99": [1, 0, 0, 2]}
    assert s.sampled_rank == [1, 1, 0, 1]  # ranks 1, 2, 3 (1-based), then outside
    assert s.sampled_logprob_mean == pytest.approx(np.mean(_on_grid(SAMPLED_P)), abs=1e-6)
    assert sum(s.entropy.histogram.counts) == sum(s.top1.histogram.counts) == sum(s.coverage.histogram.counts) == 3
    assert (s.sampling.top_p, s.sampling.seed, s.teacher.vocab_size) == (0.9, 7, 10)


def test_float16_logprobs_give_the_same_summary(hand, tmp_path):
    a = summarize(hand)
    b = summarize(_write_hand_dataset(tmp_path / "half", "float16"))
    assert b.k_needed == a.k_needed and b.sampled_rank == a.sampled_rank
    assert b.entropy.mean == pytest.approx(a.entropy.mean, abs=2e-3)
    assert b.coverage.mean == pytest.approx(a.coverage.mean, abs=1e-3)


def test_summary_rows_and_json(hand):
    s = summarize(hand)
    assert DatasetSummary.model_validate_json(s.model_dump_json()) == s
    rows = summary_rows(s)
    assert all(set(r) == {"group", "metric", "value"} and all(isinstance(v, str) for v in r.values()) for r in rows)
    by_metric = {r["metric"]: r["value"] for r in rows}
    assert by_metric["samples"] == "2" and by_metric["completion tokens"] == "3"
    assert by_metric["rank in teacher top-k (1-based)"] == "rank 1: 33.3%, ranks 2-3: 33.3%, outside top-3: 33.3%"
    assert by_metric["k for 90% of the mass"].startswith("median 3,") and by_metric["k for 99% of the mass"].startswith(
        "median >3,"
    )


def test_sample_view(hand):
    v = sample_view(hand, 1)  # the second shard's only row
    assert (v.prompt, v.finish_reason, v.decoded) == ("prompt 1", "length", False)
    [t] = v.tokens
    assert (t.token_id, t.text, t.rank) == (0, "#0", None)
    assert [c[0] for c in v.tokens[0].candidates] == [7, 8, 9]
    assert [c[2] for c in t.candidates] == pytest.approx(TOPK_P[2], abs=1e-6)
    first = sample_view(hand, 0, top=2)
    assert [tok.rank for tok in first.tokens] == [2, 1] and len(first.tokens[0].candidates) == 2
    with pytest.raises(DatasetError, match=r"sample 2 is out of range: the dataset has 2 samples \(0..1\)"):
        sample_view(hand, 2)


def test_generated_dataset_agrees_with_the_reader(generated):

    ds = generated.dataset_dir
    manifest = read_manifest(ds)
    s = summarize(ds, batch_rows=7)
    assert (s.samples, s.tokens, s.k) == (manifest.total_samples, manifest.total_tokens, manifest.k)
    assert sum(s.sampled_rank) == s.tokens and all(sum(c) == s.tokens for c in s.k_needed.values())
    assert sum(s.length.counts) == s.samples and sum(s.finish_reasons.values()) == s.samples
    samples = read_rows(ds)
    ids, lps = np.concatenate(samples.topk_ids), np.concatenate(samples.topk_logprobs).astype(np.float64)
    sampled = np.concatenate(samples.completion_tokens)
    assert s.top1.mean == pytest.approx(np.exp(lps[:, 0]).mean(), abs=1e-5)
    assert s.coverage.mean == pytest.approx(np.exp(lps).sum(1).mean(), abs=1e-5)
    assert s.sampled_rank[0] == int((sampled == ids[:, 0]).sum())
    assert s.prompts == len(set(samples.prompt_ids))
    other = summarize(ds, batch_rows=1000)
    assert (other.sampled_rank, other.k_needed, other.length) == (s.sampled_rank, s.k_needed, s.length)
    assert other.entropy.mean == pytest.approx(s.entropy.mean, rel=1e-9)


def test_cli(hand, tmp_path):
    out = runner.invoke(app, ["inspect", str(hand)])
    assert out.exit_code == 0, out.output
    assert "k for 95% of the mass" in out.output and "median 3, p90 >3" in out.output.replace("│", "")
    as_json = json.loads(runner.invoke(app, ["inspect", str(hand), "--json"]).output)
    assert (as_json["samples"], as_json["sampled_rank"]) == (2, [1, 1, 0, 1])
    view = runner.invoke(app, ["inspect", str(hand), "--sample", "0"])
    assert view.exit_code == 0 and "'#2'" in view.output and "tokenizer was not found" in view.output, view.output
    assert (
        json.loads(runner.invoke(app, ["inspect", str(hand), "--sample", "1", "--json"]).output)["tokens"][0]["rank"]
        is None
    )
    report = runner.invoke(app, ["inspect", str(hand), "--report", str(tmp_path / "r/out.html"), "--sample", "1"])
    assert report.exit_code == 0 and (tmp_path / "r/out.html").is_file(), report.output
    one_line_error(runner.invoke(app, ["inspect", str(hand), "--sample", "5"]), "sample 5 is out of range")
    one_line_error(runner.invoke(app, ["inspect", str(tmp_path / "nope")]), "no such dataset directory")
    one_line_error(runner.invoke(app, ["inspect", str(tmp_path / "r")]), "no manifest.json")


def test_cli_decodes_tokens_with_the_teachers_tokenizer(generated):
    res = runner.invoke(app, ["inspect", str(generated.dataset_dir), "--sample", "0", "--json"])
    view = json.loads(res.output)
    assert view["decoded"] and not any(t["text"].startswith("#") for t in view["tokens"])


class DevTools:
    """Minimal Chrome DevTools Protocol client over --remote-debugging-pipe (fd 3 in, fd 4 out, NUL-separated JSON)."""

    def __init__(self, user_data_dir: Path):
        self.to_chrome_r, self.to_chrome_w = os.pipe()
        self.from_chrome_r, self.from_chrome_w = os.pipe()
        # the child sees our pipe ends as fds 3 and 4
        args = [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-pipe",
            f"--user-data-dir={user_data_dir}",
            "about:blank",
        ]
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(3, 4),
            preexec_fn=self._map_fds,
        )
        os.close(self.to_chrome_r)
        os.close(self.from_chrome_w)
        self.next_id, self.buffer, self.events = 0, b"", []

    def _map_fds(self) -> None:
        read_end, write_end = os.dup(self.to_chrome_r), os.dup(self.from_chrome_w)  # neither can be clobbered below
        os.dup2(read_end, 3)
        os.dup2(write_end, 4)

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.from_chrome_r], [], [], left)[0]:
                raise TimeoutError("chromium did not answer over the DevTools pipe")
            chunk = os.read(self.from_chrome_r, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, session: str | None = None, timeout: float = 30.0, **params) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params} | ({"sessionId": session} if session else {})
        os.write(self.to_chrome_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_event(self, method: str, after: int = 0, timeout: float = 30.0) -> dict:
        """The first `method` event among those received after the first `after` ones, waiting for it if need be."""
        deadline = time.monotonic() + timeout
        for event in self.events[after:]:
            if event.get("method") == method:
                return event
        while True:
            event = self._read_message(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.to_chrome_w)
        os.close(self.from_chrome_r)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK), reason=f"{CHROMIUM} not found (the Makefile installs Debian's chromium)"
)
def test_report_renders_in_headless_chromium(hand, tmp_path):
    report = render_report(summarize(hand), sample_view(hand, 0), tmp_path / "report.html")
    page = report.read_text()
    assert "<script" not in page and "http://" not in page and "https://" not in page
    browser = DevTools(tmp_path / "chromium-profile")
    try:
        target = browser.call("Target.createTarget", url="about:blank")["targetId"]
        session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.call(f"{domain}.enable", session)
        before = len(browser.events)
        browser.call("Page.navigate", session, url=report.as_uri())
        browser.wait_event("Page.loadEventFired", after=before)
        result = browser.call(
            "Runtime.evaluate",
            session,
            returnByValue=True,
            expression=(
                "JSON.stringify({url: location.href, state: document.readyState,"
                " imgs: [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight]),"
                " tokens: [...document.querySelectorAll('span.tok')].map(s => [s.textContent, s.title,"
                " getComputedStyle(s).backgroundColor])})"
            ),
        )
        found = json.loads(result["result"]["value"])
    finally:
        browser.close()
    errors = [
        e
        for e in browser.events
        if e.get("method") in ("Runtime.exceptionThrown", "Network.loadingFailed")
        or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
        or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
    ]
    assert errors == []
    requested = [
        e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"
    ]
    assert requested and all(url.startswith(("file:", "data:")) for url in requested), requested
    assert (found["url"], found["state"]) == (report.as_uri(), "complete")
    assert len(found["imgs"]) == 4
    assert all(complete and width > 0 and height > 0 for complete, width, height in found["imgs"]), found["imgs"]
    texts, titles, colours = zip(*found["tokens"])
    assert texts == ("#2", "#4")
    assert "(rank 2)" in titles[0] and "0.499  '#1'" in titles[0] and "0.120  '#3'" in titles[0]
    assert colours[0] != colours[1]  # 1.1 nats vs 0.03 nats of teacher entropy
