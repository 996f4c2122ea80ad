"""Where the teacher runs for one generate run: in this process (hf), a vLLM engine worker, attached vLLM servers,
or managed ones.

`teacher_endpoints` yields the endpoints for the run (starting and always stopping managed servers);
`open_teacher` opens a Teacher on one of them. The shard executors (pipeline/generate.py, flows/) use both.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.teachers.base import Teacher
from pipeline.teachers.managed import ManagedServer, managed_servers, sigterm_as_exit
from pipeline.teachers.vllm_engine import EngineProcess


@dataclass(frozen=True)
class Endpoint:
    """One place shards can be sent: a server URL, the engine worker of this run, or neither for the model loaded
    in this process."""

    url: str | None = None
    model_name: str | None = None
    """Model name the server expects (vLLM's --served-model-name)."""
    server: ManagedServer | None = None
    """The process behind `url` when this run started it (None when attached)."""
    engine: EngineProcess | None = None
    """The vLLM engine worker this run started (backend vllm_engine)."""

    @property
    def label(self) -> str:
        return self.url or ("vllm-engine" if self.engine is not None else "in-process")


def max_logprobs(k: int) -> int:
    """--max-logprobs of a managed server: room for k (and vLLM's default of 20)."""
    return max(k, 20)


@contextmanager
def teacher_endpoints(cfg: RunConfig, *, max_servers: int | None = None) -> Iterator[list[Endpoint]]:
    """The run's endpoints: [in-process] for hf, the configured URLs, or managed servers started here
    (at most `max_servers` of `teacher.num_servers`) and always stopped on the way out."""
    t = cfg.teacher
    if t.backend == "vllm_engine":
        engine = EngineProcess(
            t, max_logprobs=max_logprobs(cfg.generate.k), log_path=Path(cfg.output_dir) / "teacher_engine.log"
        )
        with sigterm_as_exit():
            try:
                engine.start()
                yield [Endpoint(engine=engine)]
            finally:
                engine.stop()
    elif t.backend != "vllm_server":
        yield [Endpoint()]
    elif t.endpoints():
        yield [Endpoint(url, t.served_model_name or t.model) for url in t.endpoints()]
    else:
        count = min(t.num_servers, max_servers or t.num_servers)
        with managed_servers(
            t, count=count, max_logprobs=max_logprobs(cfg.generate.k), workdir=Path(cfg.output_dir)
        ) as servers:
            yield [Endpoint(s.url, s.model_name, s) for s in servers]


def open_teacher(cfg: RunConfig, endpoint: Endpoint) -> Teacher:
    """A Teacher on `endpoint`: the hf model loaded here, or a client of the server at its URL."""
    t = cfg.teacher
    if t.backend == "hf":
        from pipeline.teachers.hf import HFTeacher

        return HFTeacher(t)
    if t.backend == "vllm_engine":
        from pipeline.teachers.vllm_engine import VLLMEngineTeacher

        if endpoint.engine is None:
            raise ValueError("the vllm_engine backend needs the engine endpoint that teacher_endpoints() starts")
        return VLLMEngineTeacher(t, endpoint.engine)
    from pipeline.teachers.vllm_server import VLLMServerTeacher

    attach = t.model_copy(
        update={
            "url": endpoint.url,
            "urls": [],
            "num_servers": 1,
            "served_model_name": endpoint.model_name or t.served_model_name,
        }
    )
    return VLLMServerTeacher(attach, server=endpoint.server)
