"""Typed run configuration: validated once at the edge (YAML + dotted overrides), then passed explicitly.

One model per stage; the teacher backend is a discriminated union on `backend`. The generate stage's
cache key (`generate_fingerprint`) covers only what changes the teacher's output, so a change to
training settings reruns the student without touching the teacher.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.core import UserError

STAGES = ("generate", "train", "eval")
"""The stages of a run, in order; `distill run --stages` picks a subset."""


class ConfigError(UserError):
    """A configuration problem, stated in one line for the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class PromptsConfig(_Strict):
    """Where prompts come from and how they become token ids."""

    path: str
    """A .jsonl file, a .parquet file, or a directory saved by `datasets.save_to_disk`."""
    field: str = "prompt"
    """Column/key holding the prompt: a string, or a list of chat messages."""
    chat_template: bool = False
    """Apply the tokenizer's chat template (instruct teachers)."""
    limit: int | None = Field(None, ge=1)
    """Use only the first N prompts."""
    heldout_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of prompts (split by prompt id) kept out of training and used by eval."""
    max_prompt_tokens: int | None = Field(None, ge=1)
    """Prompts longer than this are invalid (None: no limit)."""
    on_invalid: Literal["skip", "fail"] = "skip"
    """Empty or too-long prompts: `skip` them and count them in the manifest, or `fail` naming the first."""
    completion_field: str = "completion"
    """`generate.mode: rescore`: the column/key holding each prompt's given completion (text, or token ids used
    as they are). Not needed when `field` holds chat messages: their last assistant turn is the completion."""
    append_eos: bool = True
    """`generate.mode: rescore`: end each plain-text completion with the teacher's EOS token, so the student
    learns to stop (chat completions end with the template's own end-of-turn; token-id completions are kept)."""
    completions_by: str | None = None
    """`generate.mode: rescore`: who wrote the completions (recorded in the manifest; on-policy rounds name the
    student checkpoint)."""
    overlong: Literal["skip", "truncate"] = "skip"
    """`generate.mode: rescore`: a prompt + completion longer than the teacher's context is skipped and counted,
    or its completion is cut to fit (counted, finish_reason `given_truncated`)."""


RESCORE_ONLY = ("completion_field", "append_eos", "overlong", "completions_by")
"""`prompts` settings that only `generate.mode: rescore` reads."""


class GenerateConfig(_Strict):
    """Sampling settings of the teacher; together with teacher+prompts they key the dataset cache."""

    mode: Literal["sample", "rescore"] = "sample"
    """`sample`: the teacher writes the completions. `rescore`: the completions come with the prompts
    (`prompts.completion_field` or chat messages) and the teacher is forced through them, scoring every token."""
    k: int = Field(20, ge=1, le=1000)
    """Top-k token ids and logprobs stored per generated token."""
    n: int = Field(1, ge=1)
    """Completions sampled per prompt."""
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(64, ge=1)
    seed: int = 0
    shard_size: int = Field(1024, ge=1)
    """Prompts per Parquet shard; a shard is the unit of resume."""
    logprobs_dtype: Literal["float16", "float32"] = "float32"

    @model_validator(mode="after")
    def _rescore_samples_nothing(self) -> GenerateConfig:
        if self.mode == "rescore" and self.n != 1:
            raise ValueError("generate.n samples completions; rescore scores each given completion once: drop n")
        return self


class ShrinkConfig(_Strict):
    """Student built from the teacher's config with these fields replaced (randomly initialised)."""

    hidden_size: int | None = Field(None, ge=8)
    intermediate_size: int | None = Field(None, ge=8)
    num_hidden_layers: int | None = Field(None, ge=1)
    num_attention_heads: int | None = Field(None, ge=1)
    num_key_value_heads: int | None = Field(None, ge=1)
    head_dim: int | None = Field(None, ge=8)


class FromTeacherConfig(_Strict):
    """Student cut from the teacher: a subset of its decoder layers, optionally narrower, the kept weights copied
    (pipeline/prune.py; narrowing keeps the channels, heads and neurons with the largest weight norm)."""

    layers: list[int] | int | Literal["every_other"] | None = None
    """Teacher layers kept: a list of indices in increasing order, `every_other` (0, 2, 4, ...), or a count (spread
    evenly, the first and the last kept). Default: all."""
    hidden_size: int | None = Field(None, ge=8)
    """Narrower residual stream (default: the teacher's)."""
    intermediate_size: int | None = Field(None, ge=1)
    """Fewer MLP neurons per layer."""
    num_attention_heads: int | None = Field(None, ge=1)
    """Fewer query heads per layer (whole heads: head_dim stays the teacher's)."""
    num_key_value_heads: int | None = Field(None, ge=1)
    """Fewer key/value heads (default: the teacher's query heads per key/value head are kept)."""

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, value: Any) -> Any:
        if value is None or value == "every_other":
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise ValueError("keep at least 1 layer")
            return value
        if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            raise ValueError("give a list of layer indices, `every_other` or a layer count")
        if not value or value[0] < 0 or any(b <= a for a, b in zip(value, value[1:], strict=False)):
            raise ValueError("list teacher layers (>= 0) in increasing order without repeats, e.g. [0, 2, 4]")
        return value

    @model_validator(mode="after")
    def _whole_groups(self) -> FromTeacherConfig:
        heads, kv = self.num_attention_heads, self.num_key_value_heads
        if heads is not None and kv is not None and heads % kv:
            raise ValueError(
                f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv}): heads come in groups"
            )
        return self


class StudentConfig(_Strict):
    """Where the student starts: a pretrained path/id, a shrunk copy of the teacher's config, or the teacher cut."""

    model: str | None = None
    """Pretrained student (path or hub id). Exactly one of `model`, `shrink`, `from_teacher`."""
    shrink: ShrinkConfig | None = None
    from_teacher: FromTeacherConfig | None = None
    revision: str | None = None
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> StudentConfig:
        if sum(x is not None for x in (self.model, self.shrink, self.from_teacher)) != 1:
            raise ValueError(
                "set exactly one of student.model (pretrained), student.shrink (from teacher config) or "
                "student.from_teacher (the teacher's layers, copied)"
            )
        return self

    def identity(self) -> dict:
        """The fields that make the student (`from_teacher` only when set: keys of earlier runs stay as they were)."""
        return self.model_dump(exclude=set() if self.from_teacher else {"from_teacher"})


class MixConfig(_Strict):
    """Another dataset trained on beside the run's own (`train.mix`)."""

    path: str
    """A dataset directory (a run's `<output_dir>/dataset`) made with the same teacher tokenizer and k."""
    repeat: int = Field(1, ge=1)
    """Times each of its training samples is seen per epoch (the run's own dataset: once)."""


class FeatureLossConfig(_Strict):
    """FitNets-style hidden-state matching against the live teacher (`train.live_teacher`)."""

    weight: float = Field(0.0, ge=0.0)
    """w_feat in the total loss; 0: off."""
    kind: Literal["mse", "cosine"] = "cosine"
    """Per token: 1 - cosine similarity (scale-free: real LLMs' residual streams carry a few huge outlier dimensions
    that would dominate a squared difference), or `mse`, the mean squared difference (FitNets)."""
    layer_map: dict[int, int] | None = None
    """Student decoder layer -> teacher decoder layer (a layer's output; 0-based, negative counts from the end).
    Default: every student layer, each to the teacher layer at the same relative depth (last to last). Where the
    hidden sizes differ, a learned linear projection maps the student's states to the teacher's width."""


class AttentionLossConfig(_Strict):
    """MiniLMv2-style self-attention relation distillation against the live teacher."""

    weight: float = Field(0.0, ge=0.0)
    """w_attn in the total loss; 0: off."""
    layer_map: dict[int, int] | None = None
    """Student layer -> teacher layer whose relations are matched. Default: the last to the last (MiniLMv2)."""
    relations: list[Literal["query", "key", "value"]] = Field(["query", "key", "value"], min_length=1)
    """Vector types whose scaled dot-product relations are matched (query-query, key-key, value-value)."""
    relation_heads: int | None = Field(None, ge=1)
    """Relation heads each vector type is split into (on both models, so head counts and sizes may differ).
    Default: the largest number up to the student's attention heads that divides every width."""


class RelationLossConfig(_Strict):
    """RKD distance and angle losses between the sequences of each micro-batch, on pooled representations."""

    weight: float = Field(0.0, ge=0.0)
    """w_rel in the total loss; 0: off."""
    student_layer: int = -1
    """The decoder layer whose output, averaged over the completion tokens, represents a sequence."""
    teacher_layer: int = -1
    distance: float = Field(1.0, ge=0.0)
    """Weight of the distance loss inside the relation loss (RKD: 1)."""
    angle: float = Field(2.0, ge=0.0)
    """Weight of the angle loss inside the relation loss (RKD: 2)."""

    @model_validator(mode="after")
    def _some_part(self) -> RelationLossConfig:
        if self.weight > 0 and self.distance == 0 and self.angle == 0:
            raise ValueError("train.relation.weight > 0 with distance and angle both 0 adds nothing; weight one")
        return self


LIVE_FIELDS = ("live_teacher", "feature", "attention", "relation")
"""Train settings that only act with a live teacher (left out of the train key while it is off)."""


class TrainConfig(_Strict):
    """Student training: loss = alpha*CE + (1-alpha)*T^2*D(teacher top-k || student)."""

    alpha: float = Field(0.0, ge=0.0, le=1.0)
    """Weight of the cross-entropy on sampled tokens; 1 - alpha goes to the divergence."""
    temperature: float = Field(1.0, gt=0.0)
    kind: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = Field(0.5, ge=0.0, le=1.0)
    """JSD mixture weight (0: forward KL, 1: reverse KL)."""
    tail_bucket: bool = False
    max_steps: int = Field(500, ge=1)
    batch_size: int = Field(32, ge=1)
    """Sequences per micro-batch."""
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(20, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    loss_chunk_size: int = Field(1024, ge=1)
    """Positions per chunk through the LM head, bounding loss memory."""
    gradient_checkpointing: bool = False
    """Recompute the student's layer activations in backward: less memory, about a third more compute."""
    checkpoint_every: int = Field(500, ge=0)
    """Save a resumable checkpoint every N optimizer steps (0: never); `--resume` continues from the newest."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept on disk (the older ones are deleted); more than one survives a damaged newest."""
    seed: int = 0
    device: str = "auto"
    log_every: int = Field(25, ge=1)
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = []
    """Experiment trackers that get every logged step's loss parts, lr, grad_norm and tokens/s, written under
    `<output_dir>/trackers/` (MLflow: a local file store; W&B: offline); the run is named after `name`."""
    mix: list[MixConfig] = []
    """More datasets to train on with the run's own, e.g. a re-scored SFT set beside teacher samples (their
    held-out prompts stay out of training too; evaluation uses the run's own dataset)."""
    live_teacher: bool = False
    """Load the teacher with transformers in the training process and run it on every micro-batch (no grad), for
    the feature, attention and relation losses; the top-k loss still comes from the dataset."""
    feature: FeatureLossConfig = FeatureLossConfig()
    attention: AttentionLossConfig = AttentionLossConfig()
    relation: RelationLossConfig = RelationLossConfig()

    @model_validator(mode="after")
    def _live_families(self) -> TrainConfig:
        on = [name for name in ("feature", "attention", "relation") if getattr(self, name).weight > 0]
        if on and not self.live_teacher:
            raise ValueError(
                f"train.{on[0]}.weight > 0 needs train.live_teacher: true (hidden states and attention are not in "
                "the dataset; the teacher runs beside the student in training)"
            )
        return self

    @property
    def live_families(self) -> list[str]:
        """The live-teacher loss families with a weight, in the order feature, attention, relation."""
        return [name for name in ("feature", "attention", "relation") if getattr(self, name).weight > 0]


class OnPolicyConfig(_Strict):
    """Rounds after the first (`rounds` > 1): the student samples, the teacher scores, the student trains on."""

    share: float = Field(0.25, gt=0.0, le=1.0)
    """Share of the training prompts the student samples each round (drawn per round, the same on a rerun)."""
    n: int = Field(1, ge=1)
    """Completions the student samples per prompt."""
    temperature: float = Field(1.0, ge=0.0)
    max_new_tokens: int | None = Field(None, ge=1)
    """Default: generate.max_new_tokens."""
    steps: int = Field(200, ge=1)
    """Student optimizer steps per round (from the previous round's student; the optimizer starts afresh)."""
    repeat: int = Field(1, ge=1)
    """Times the round's own samples are seen per epoch; each earlier dataset's once."""
    earlier: Literal["all", "teacher", "none"] = "all"
    """Earlier data trained on beside the round's: every earlier round's and the teacher's samples, only the
    teacher's samples (round 0), or none."""
    kind: Literal["forward_kl", "reverse_kl", "jsd"] = "reverse_kl"
    """The divergence in rounds: reverse KL on the student's own samples is the classic on-policy objective."""
    tail_bucket: bool = True
    """Needed by reverse_kl and jsd: without it they only see the student renormalised over the teacher's top-k,
    and moving the student's mass off the top-k costs nothing (docs/design.md)."""
    alpha: float = Field(0.0, ge=0.0, le=1.0)
    """CE weight in rounds: 0, as CE on the student's own samples would reinforce its own mistakes."""
    lr: float | None = Field(None, gt=0)
    """Peak lr of a round's warmup + cosine. Default: the lr round 0's schedule ended at (10% of train.lr): a warm
    student warmed up again to the full peak is knocked back (docs/design.md, "On-policy rounds")."""


class LMEvalConfig(_Strict):
    """lm-evaluation-harness tasks scored on the student and the teacher, side by side in metrics.json."""

    tasks: list[str] = Field(min_length=1)
    """Task or group names: the harness's own (hub datasets) or ones defined in `include_path`."""
    include_path: str | None = None
    """A folder of task YAMLs (e.g. `data/lm_eval`, the demo's tasks over a shipped JSONL)."""
    limit: int | None = Field(None, ge=1)
    """Documents per task (None: all)."""
    num_fewshot: int | None = Field(None, ge=0)
    batch_size: int = Field(16, ge=1)
    chat_template: bool = False
    """Render each request through the tokenizer's chat template (instruct models)."""
    teacher: bool = True
    """Score the teacher too (once per teacher and task settings: cached under output_dir/lm_eval)."""


class EvalConfig(_Strict):
    """Held-out evaluation of teacher vs student."""

    task: Literal["demo", "none"] = "none"
    """`demo` scores completions with the demo task's exact checker; `none` skips accuracy."""
    max_prompts: int = Field(2000, ge=1)
    batch_size: int = Field(256, ge=1)
    seed: int = 0
    lm_eval: LMEvalConfig | None = None
    """Standard benchmarks through lm-evaluation-harness (the `lmeval` extra); None skips them."""


class RunConfig(_Strict):
    """A whole distillation run."""

    name: str = "run"
    output_dir: str = "data/runs/run"
    """Dataset, student and metrics go under this directory."""
    teacher: TeacherConfig
    prompts: PromptsConfig
    generate: GenerateConfig = GenerateConfig()
    student: StudentConfig
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    rounds: int = Field(1, ge=1)
    """Training rounds: round 0 trains on the teacher's samples; each later round on the previous student's own
    samples scored by the teacher (`on_policy`), under `<output_dir>/rounds/<r>/`."""
    on_policy: OnPolicyConfig = OnPolicyConfig()

    @model_validator(mode="before")
    @classmethod
    def _default_backend(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("teacher"), dict) and "backend" not in data["teacher"]:
            data = {**data, "teacher": {**data["teacher"], "backend": "hf"}}
        return data

    @property
    def dataset_dir(self) -> Path:
        return Path(self.output_dir) / "dataset"

    @property
    def student_dir(self) -> Path:
        return Path(self.output_dir) / "student"

    @property
    def metrics_path(self) -> Path:
        return Path(self.output_dir) / "metrics.json"

    def generate_fingerprint(self) -> str:
        """Hash of everything that changes the teacher's output (teacher, prompts, sampling)."""
        # on_invalid only decides whether a run stops; the prompts that are kept are the same. In sample mode the
        # rescore settings change nothing, and leaving them (and the mode) out keeps the keys datasets made before
        # rescore mode existed.
        sample = self.generate.mode == "sample"
        return _hash(
            {
                "teacher": self.teacher.identity(),
                "prompts": self.prompts.model_dump(exclude={"on_invalid", *(RESCORE_ONLY if sample else ())}),
                "generate": self.generate.model_dump(exclude={"mode"} if sample else set()),
            }
        )

    def train_fingerprint(self) -> str:
        """Hash of what a resumed training run must share with the run that wrote the checkpoint.

        Left out: settings that change where training runs, how often it logs and saves, and how much memory a step
        takes (`gradient_checkpointing`, `loss_chunk_size`: the same numbers up to float summation order), so a run
        that ran out of memory can resume with them changed."""
        operational = {
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
            "device",
            "gradient_checkpointing",
            "loss_chunk_size",
            "report_to",
        }
        key = {"student": self.student.identity()}
        if self.train.live_teacher:  # the teacher itself then shapes training, not only through the dataset
            key["live_teacher"] = self.teacher.model_dump(include={"model", "revision"})
        else:  # the live settings act only with it: keys of runs without one stay as they were
            operational |= set(LIVE_FIELDS)
        return _hash({**key, "train": self.train.model_dump(exclude=operational)})

    def config_hash(self) -> str:
        return _hash(self.model_dump())


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted!r}: {key!r} is not a section")
    node[leaf] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`train.lr=1e-3` -> ("train.lr", 0.001); the value is parsed as YAML so types come out right."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        for sub in getattr(ann, "__args__", (ann,)) + getattr(getattr(ann, "__origin__", None), "__args__", ()):
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                keys.extend(_all_keys(sub, prefix + name + "."))
    return keys


def _explain(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"] if str(p) not in ("hf", "vllm_server", "vllm_engine"))
    if e["type"] == "extra_forbidden":
        close = difflib.get_close_matches(loc, _all_keys(RunConfig), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown config key {loc!r}{hint}"
    if e["type"] == "missing":
        return f"missing required config key {loc!r}"
    msg = e["msg"].removeprefix("Value error, ")
    return f"config key {loc!r}: {msg}" if loc else f"config: {msg}"


def build_config(raw: dict, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Validate a raw dict (+ dotted overrides) into a RunConfig, or raise ConfigError in one line."""
    tree = json.loads(json.dumps(raw))
    for item in overrides:
        _set_dotted(tree, *parse_override(item))
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_explain(err)) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config file, apply `key.path=value` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: YAML syntax error{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config sections")
    return build_config(raw, overrides)
