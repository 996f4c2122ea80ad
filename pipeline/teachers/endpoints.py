"""Where the teacher runs for one generate run: in this process (hf), a vLLM engine worker, attached vLLM servers,
or managed ones.

`teacher_endpoints` yields the endpoints for the run (starting and always stopping managed servers and the
engine); `open_teacher` opens a Teacher on one of them, and `shared_teacher` keeps one open per endpoint in this
process, so shards that run as separate tasks do not set up a client (tokenizer, HTTP pool) each. The shard
executors (pipeline/shards.py, flows/) use them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.teachers.base import Teacher, TeacherServerError
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
    name: str | None = None
    """The label of an endpoint without URL or process at hand (see `local`)."""

    @property
    def label(self) -> str:
        return self.url or self.name or (ENGINE if self.engine is not None else IN_PROCESS)

    @classmethod
    def local(cls, cfg: RunConfig) -> Endpoint:
        """The endpoint of a shard that runs where its teacher is: the hf model, or the run's engine (found by
        `shared_teacher` in the process that started it)."""
        return cls(name=ENGINE) if cfg.teacher.backend == "vllm_engine" else cls()


IN_PROCESS = "in-process"
ENGINE = "vllm-engine"
"""Labels of the endpoints that have no URL: the hf model loaded where the shard runs, and this run's engine."""


def max_logprobs(k: int) -> int:
    """--max-logprobs of a managed server: room for k (and vLLM's default of 20)."""
    return max(k, 20)


@contextmanager
def teacher_endpoints(cfg: RunConfig, *, max_servers: int | None = None) -> Iterator[list[Endpoint]]:
    """The run's endpoints: [in-process] for hf, the engine worker started here (vllm_engine), the configured
    URLs, or managed servers started here (at most `max_servers` of `teacher.num_servers`); what was started is
    always stopped on the way out."""
    with _started(cfg, max_servers) as started:
        try:
            yield started
        finally:
            release_teachers(cfg, started)  # the shared teachers of this run, before its servers or engine stop


@contextmanager
def _started(cfg: RunConfig, max_servers: int | None) -> Iterator[list[Endpoint]]:
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


_shared: dict[tuple, Teacher] = {}
_shared_lock = threading.Lock()


def shared_teacher(cfg: RunConfig, endpoint: Endpoint) -> Teacher:
    """The Teacher of this process for `endpoint` and this teacher config, opened on first use and kept until
    `teacher_endpoints` releases it (a process that only runs shards, e.g. a Ray worker, keeps it for its
    lifetime). An endpoint without a URL (`Endpoint.local`) finds the one opened with the run's real endpoint:
    that is how a shard task reaches the engine its flow started. Teachers are safe to share between threads."""
    key = _shared_key(cfg, endpoint)
    with _shared_lock:
        if key not in _shared:
            if cfg.teacher.backend == "vllm_engine" and endpoint.engine is None:
                raise TeacherServerError(
                    "a vllm_engine shard ran in a process without the run's engine; the engine backend runs its "
                    "shards where `distill` started it: use the thread task runner, or vllm_server with teacher.urls"
                )
            _shared[key] = open_teacher(cfg, endpoint)
        return _shared[key]


def _shared_key(cfg: RunConfig, endpoint: Endpoint) -> tuple:
    # endpoints without a URL are the backend's one local teacher (the hf model, or the run's engine)
    return (endpoint.url or cfg.teacher.backend, endpoint.model_name, cfg.teacher.model_dump_json())


def release_teachers(cfg: RunConfig, endpoints: list[Endpoint]) -> None:
    """Close this process's shared teachers of these endpoints (before their servers or engine stop)."""
    keys = {_shared_key(cfg, e) for e in endpoints}
    with _shared_lock:
        gone = [k for k in _shared if k in keys]
        teachers = [_shared.pop(k) for k in gone]
    for teacher in teachers:
        teacher.close()
