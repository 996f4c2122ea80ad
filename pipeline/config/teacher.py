"""The teacher section: one model per backend (hf, vllm_server, vllm_engine), a union on `backend`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from pipeline.config.base import _Strict


class HFTeacherConfig(_Strict):
    """Teacher run in-process with transformers `generate` (CPU path and parity reference)."""

    backend: Literal["hf"] = "hf"
    model: str
    """Local path or hub id, loaded with `from_pretrained`."""
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    """`auto` picks cuda when available, else cpu."""
    batch_size: int = Field(64, ge=1)
    """Prompts per `generate` call."""
    trust_remote_code: bool = False

    def identity(self) -> dict:
        """Fields that change the outputs (batch size does: sampling draws from one RNG per batch)."""
        return self.model_dump(include={"backend", "model", "revision", "dtype", "batch_size"})


class VLLMServerTeacherConfig(_Strict):
    """Teacher behind vLLM's OpenAI-compatible server: one we start from the teacher env, or `url` to attach."""

    backend: Literal["vllm_server"] = "vllm_server"
    model: str
    """Path or hub id the server loads; its tokenizer is loaded locally to tokenize prompts."""
    revision: str | None = None
    url: str | None = None
    """Attach to a server already running at this base URL (e.g. http://10.0.0.5:8000); none is started."""
    urls: list[str] = []
    """Attach to several servers of the same model; `distill run` spreads the shards over them."""
    num_servers: int = Field(1, ge=1)
    """Managed servers `distill run` starts (each on its own free port) and spreads the shards over."""
    served_model_name: str | None = None
    """Model name the attached server expects (default: `model`)."""
    api_key_env: str | None = None
    """Name of the environment variable holding the server's API key (the key never enters configs or logs)."""
    python: str = ".venv-teacher/bin/python"
    """Interpreter of the teacher environment that has vLLM (managed server only)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int | None = Field(None, ge=16)
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Fraction of accelerator memory for vLLM (on CPU builds keep it low, ~0.3)."""
    cpu_kvcache_space_gb: int | None = Field(None, ge=1)
    """VLLM_CPU_KVCACHE_SPACE for CPU builds of vLLM (GiB of KV cache)."""
    startup_timeout_s: float = Field(600.0, gt=0)
    concurrency: int = Field(64, ge=1)
    """Requests in flight at once, so the server's continuous batcher stays full."""
    request_timeout_s: float = Field(600.0, gt=0)
    max_retries: int = Field(5, ge=0)
    """Retries (exponential backoff) on connection errors and HTTP 5xx."""
    extra_args: list[str] = []
    """More `vllm serve` flags for a managed server, e.g. ["--enforce-eager"]."""
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_way_to_reach_servers(self) -> VLLMServerTeacherConfig:
        if self.url and self.urls:
            raise ValueError("set teacher.url (one server) or teacher.urls (several), not both")
        if self.num_servers > 1 and (self.url or self.urls):
            raise ValueError("teacher.num_servers starts managed servers; it cannot be combined with teacher.url/urls")
        if len(set(self.urls)) != len(self.urls):
            raise ValueError("teacher.urls lists the same server twice")
        return self

    def endpoints(self) -> list[str]:
        """Base URLs of the servers to attach to (empty: managed servers are started)."""
        return [u.rstrip("/") for u in ([self.url] if self.url else self.urls)]

    def identity(self) -> dict:
        """Fields that change the outputs (URLs, server count, key, concurrency and retries do not: seeds are
        per request)."""
        return self.model_dump(
            include={"backend", "model", "revision", "dtype", "max_model_len", "tensor_parallel_size", "extra_args"}
        )


class VLLMEngineTeacherConfig(_Strict):
    """Teacher in vLLM's offline engine (`vllm.LLM`), run by a worker process from the teacher env for the whole
    generate run: each shard is one continuously batched call, answered as arrays (no HTTP, no JSON per token)."""

    backend: Literal["vllm_engine"] = "vllm_engine"
    model: str
    """Path or hub id the engine loads; its tokenizer is loaded locally to tokenize prompts."""
    revision: str | None = None
    python: str = ".venv-teacher/bin/python"
    """Interpreter of the teacher environment that has vLLM."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int | None = Field(None, ge=16)
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Fraction of accelerator memory for vLLM (on CPU builds keep it low, ~0.3)."""
    cpu_kvcache_space_gb: int | None = Field(None, ge=1)
    """VLLM_CPU_KVCACHE_SPACE for CPU builds of vLLM (GiB of KV cache)."""
    startup_timeout_s: float = Field(600.0, gt=0)
    engine_args: dict[str, Any] = {}
    """More `vllm.LLM` keyword arguments, e.g. {enforce_eager: true, max_num_seqs: 512}."""
    trust_remote_code: bool = False

    def identity(self) -> dict:
        """Fields that change the outputs."""
        return self.model_dump(
            include={"backend", "model", "revision", "dtype", "max_model_len", "tensor_parallel_size", "engine_args"}
        )


TeacherConfig = Annotated[
    HFTeacherConfig | VLLMServerTeacherConfig | VLLMEngineTeacherConfig, Field(discriminator="backend")
]
