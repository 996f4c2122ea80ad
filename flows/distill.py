"""The `distill` Prefect flow: generate -> train -> eval, each stage one library call.

Tasks pass paths and hashes, never models or tables. The generate stage is the library's orchestrator
(`pipeline.generate.generate_dataset`) with `PrefectShards` as its executor: one task per shard, cached on
the generate key and the shard index, retried on infrastructure errors on the next endpoint. A rerun that
changes only training settings, or `stages=["train", "eval"]`, submits no shard task and starts no teacher.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.context import TaskRunContext
from prefect.exceptions import ObjectNotFound
from prefect.futures import as_completed
from prefect.runtime import task_run as current_task_run
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline.benchmarks import rows as benchmark_rows
from pipeline.config import STAGES, ConfigError, RunConfig
from pipeline.core import as_user_error
from pipeline.dataset.schema import SHARDS_DIR, shard_name
from pipeline.dataset.stats import summarize
from pipeline.dataset.summary_text import summary_rows
from pipeline.dataset.validate import shard_is_intact
from pipeline.evaluate import evaluate
from pipeline.generate import GenerateResult, generate_dataset
from pipeline.rounds import RoundResult, evaluate_round, round_dir, run_round, student_of
from pipeline.shards import ShardDone, ShardEvent, ShardFailed, ShardWork, run_shard
from pipeline.teachers import Endpoint, shared_teacher
from pipeline.train import TrainResult, train_student

TEACHER_TAG = "distill-teacher"
"""Tag of the served shard tasks; a Prefect concurrency limit an operator sets on it caps the shards calling
teachers at once, across runs."""
SHARDS_PER_ENDPOINT = 2
"""Shard tasks the flow keeps in flight per served endpoint: the next shard's start overlaps the last one's tail."""


def _retry_on_infrastructure(task, task_run, state) -> bool:
    """Retry crashes and connection trouble, not user errors (bad input fails the same way again)."""
    try:
        state.result()
    except Exception as err:
        return as_user_error(err) is None
    return False


@task(
    name="generate-shard",
    tags=[TEACHER_TAG],
    persist_result=True,
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=_retry_on_infrastructure,
    task_run_name="generate-shard-{index}",
    cache_key_fn=lambda ctx, params: f"distill-shard-{params['key']}-{params['index']}",
)
def shard_task(
    cfg: RunConfig, key: str, index: int, urls: list[str], served_model_name: str | None = None, slot: int | None = None
) -> dict:
    """The teacher completes shard `index` and its file is written; the orchestrator commits it.

    `key` is `generate_key(cfg)`: with the index it is the cache key. Endpoints are not part of it; the shard goes
    to urls[slot] (default: urls[index % n]) and each retry moves on to the next server; [] = the teacher where
    this task runs (the hf model, or the run's engine). The teacher is this process's shared one for the endpoint
    (`shared_teacher`): a client is set up once per endpoint, not once per shard.
    """
    run = TaskRunContext.get().task_run
    if urls:
        first = index if slot is None else slot
        endpoint = Endpoint(urls[(first + max(run.run_count, 1) - 1) % len(urls)], served_model_name)
    else:
        endpoint = Endpoint.local(cfg)
    done = run_shard(cfg, index, shared_teacher(cfg, endpoint), endpoint)
    return {**done.model_dump(), "task_run_id": str(run.id)}


def teacher_limit() -> int | None:
    """The tag concurrency limit on teacher calls an operator set (`prefect concurrency-limit create
    distill-teacher N`), or None. The flow creates none: it keeps SHARDS_PER_ENDPOINT shards in flight per
    endpoint itself, so no shard waits on a slot it could have had."""
    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(f"tag:{TEACHER_TAG}").limit
        except ObjectNotFound:
            return None


@dataclass
class PrefectShards:
    """Shard executor of the flow: a Prefect task per shard, yielding each as it finishes.

    Served teachers: the executor keeps SHARDS_PER_ENDPOINT tasks in flight per endpoint (the next shard's start
    overlaps the last one's tail) on the flow's task runner, starting the next as soon as one finishes. The vLLM
    engine (in this process): as many tasks in flight, on threads of this process. The hf model: one task after
    another in this thread (its samples depend on torch's global RNG). Tasks in this process carry no tag. A
    cached result counts only while its file matches it; otherwise the shard runs again.
    """

    per_endpoint: int = SHARDS_PER_ENDPOINT
    parallel: ClassVar[bool] = True

    def __call__(self, cfg: RunConfig, work: ShardWork, endpoints: list[Endpoint]) -> Iterator[ShardEvent]:
        urls = [e.url for e in endpoints if e.url]
        served = endpoints[0].model_name if urls else None

        def task_for(index: int, **options):
            # a cached result can only be right if its file is there: shards without a file skip the cache
            orphan = (work.dataset_dir / SHARDS_DIR / shard_name(index)).is_file()
            return shard_task.with_options(refresh_cache=not orphan, **options)

        def outcome(index: int, state, run_id: str) -> ShardEvent:
            if state.is_failed() or state.is_crashed():
                try:
                    state.result()
                except BaseException as err:  # noqa: B036  (handed to the orchestrator, which raises it)
                    return ShardFailed(index, err)
            result = state.result()
            done = ShardDone.model_validate({k: v for k, v in result.items() if k != "task_run_id"})
            done.cached = result["task_run_id"] != run_id
            if done.cached and not shard_is_intact(work.dataset_dir, done.shard):
                get_run_logger().warning("cached shard %d does not match its file; generating it again", index)
                fresh = shard_task.with_options(refresh_cache=True)
                state = fresh(cfg, work.key, index, urls, served, return_state=True)
                return outcome(index, state, str(state.state_details.task_run_id))
            return done

        if endpoints[0].engine is not None:
            # The run's engine lives in this process, so its tasks run on threads here whatever the flow's runner
            # is: two in flight, so one task's Prefect bookkeeping and Parquet write overlap the next one's engine
            # time (the engine itself takes one request at a time).
            shared_teacher(cfg, endpoints[0])  # opened here, with the engine at hand; the tasks find it
            with ThreadPoolTaskRunner(max_workers=self.per_endpoint) as local:

                def submit_local(index: int, slot: int):
                    params = {"cfg": cfg, "key": work.key, "index": index, "urls": [], "served_model_name": None}
                    return local.submit(task_for(index, tags=set()), parameters=params)

                yield from self._window(work.todo, 1, submit_local, outcome)
            return
        if not urls:  # the hf model: one shard at a time in this thread (its samples depend on that)
            for index in work.todo:
                state = task_for(index, tags=set())(cfg, work.key, index, [], return_state=True)
                yield outcome(index, state, str(state.state_details.task_run_id))
            return
        limit = teacher_limit()
        get_run_logger().info(
            "%d shard(s) to generate over %d endpoint(s), %d in flight per endpoint%s",
            len(work.todo),
            len(urls),
            self.per_endpoint,
            f" (operator limit tag:{TEACHER_TAG} = {limit})" if limit is not None else "",
        )
        yield from self._window(
            work.todo,
            len(urls),
            lambda index, slot: task_for(index).submit(cfg, work.key, index, urls, served, slot),
            outcome,
        )

    def _window(self, todo: list[int], endpoints: int, submit, outcome) -> Iterator[ShardEvent]:
        """Keep `per_endpoint` tasks in flight on each of `endpoints` (shard i starts on endpoint i mod n), start
        the next as soon as one finishes, and yield each outcome as it arrives."""
        pending, running, load = list(todo), {}, Counter()

        def fill() -> None:
            while pending:
                slot = min(range(endpoints), key=lambda s: load[s])
                if load[slot] >= self.per_endpoint:
                    return
                index = pending.pop(0)
                running[submit(index, slot)] = (index, slot)
                load[slot] += 1

        fill()
        while running:
            future = next(iter(as_completed(list(running))))
            index, slot = running.pop(future)
            load[slot] -= 1
            fill()  # the next shard starts before this one is committed
            future.wait()  # sets the future's final state; `.state` alone may re-read it from the API
            yield outcome(index, future.state, str(future.task_run_id))


@dataclass
class RunOutput:
    """What one flow run did: per-stage results, seconds per stage, and the paths written."""

    stages: list[str]
    seconds: dict[str, float] = field(default_factory=dict)
    generate: GenerateResult | None = None
    train: TrainResult | None = None
    eval: dict | None = None
    rounds: list[RoundResult] = field(default_factory=list)
    """On-policy rounds 1.. (config `rounds` > 1)."""
    paths: dict[str, str] = field(default_factory=dict)


def _flat(result: TrainResult) -> dict:
    """The result as one table row: the live-teacher parts as `final_feature`, ... columns."""
    row = asdict(result)
    return {**row, **{f"final_{name}": value for name, value in row.pop("final_live").items()}}


def _round(row: dict) -> dict:
    return {k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}


@task(name="train", retries=1, retry_delay_seconds=5, retry_condition_fn=_retry_on_infrastructure)
def train_task(cfg: RunConfig, dataset_dir: str, resume: bool = False) -> TrainResult:
    """Student trains on the dataset's training split; a retry (or `resume`) continues from the last checkpoint."""
    resume = resume or current_task_run.run_count > 1
    result = train_student(cfg, dataset_dir=Path(dataset_dir), resume=resume)
    create_table_artifact(
        key="training-metrics", description=f"student {result.student_dir}", table=[_round(_flat(result))]
    )
    log = json.loads((Path(result.student_dir) / "train_log.json").read_text())
    create_table_artifact(
        key="training-curve",
        description="loss parts and throughput per logged step",
        table=[_round(h) for h in log["history"]],
    )
    curve = (Path(result.student_dir) / "loss_curves.png").resolve()
    create_link_artifact(
        key="loss-curves",
        link=curve.as_uri(),
        link_text=f"loss curves ({curve})",
        description="PNG of CE, KD and total loss against steps, written beside the student",
    )
    return result


@task(name="eval")
def eval_task(cfg: RunConfig, dataset_dir: str, student_dir: str) -> dict:
    """Student vs teacher on held-out prompts (with rounds, also on the student's own held-out samples)."""
    if cfg.rounds > 1:
        metrics = evaluate_round(cfg, 0)
    else:
        metrics = evaluate(cfg, dataset_dir=Path(dataset_dir), student_dir=Path(student_dir))
    rows = [{"model": who, **_round(metrics[who])} for who in ("teacher", "student")]
    create_table_artifact(key="evaluation", table=rows, description="held-out evaluation")
    if metrics.get("lm_eval"):
        create_table_artifact(
            key="lm-eval",
            table=[_round(row) for row in benchmark_rows(metrics["lm_eval"])],
            description="lm-evaluation-harness tasks: teacher vs student",
        )
    return metrics


@task(
    name="round",
    task_run_name="round-{r}",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=_retry_on_infrastructure,
)
def round_task(cfg: RunConfig, r: int, stages: list[str]) -> RoundResult:
    """On-policy round r: the previous student samples, the teacher scores, the student trains on and is evaluated."""
    result = run_round(cfg, r, stages)
    if result.metrics is not None:
        create_table_artifact(
            key=f"round-{r}-evaluation",
            table=[{"model": who, **_round(result.metrics[who])} for who in ("teacher", "student")]
            + [{"model": "student (own samples)", **_round(result.metrics["on_policy"])}],
            description=f"round {r}: held-out evaluation, and the student's own held-out samples scored by the teacher",
        )
    return result


def rounds_table(cfg: RunConfig) -> list[dict]:
    """One row per round with its metrics (rounds whose metrics.json is written)."""
    rows = []
    for r in range(cfg.rounds):
        path = cfg.metrics_path if r == 0 else round_dir(cfg, r) / "metrics.json"
        if not path.is_file():
            continue
        m = json.loads(path.read_text())
        own = m.get("on_policy", {})
        rows.append(
            _round(
                {
                    "round": r,
                    "kl (teacher samples)": m["student"]["kl"],
                    "accuracy": m["student"].get("accuracy"),
                    "reverse kl (own samples)": own.get("reverse_kl"),
                    "accuracy (own samples)": own.get("accuracy"),
                }
            )
        )
    return rows


def dataset_artifacts(cfg: RunConfig, gen: GenerateResult) -> None:
    """The generate stage's summary and the full `distill inspect` table of the dataset."""
    t = cfg.teacher
    create_table_artifact(
        key="dataset-summary",
        description=f"dataset {gen.dataset_dir}",
        table=[
            {
                "samples": gen.samples,
                "tokens": gen.tokens,
                "shards generated": gen.shards_written,
                "shards cached": gen.shards_cached,
                "k": cfg.generate.k,
                "teacher": t.model,
                "backend": t.backend,
                "temperature": cfg.generate.temperature,
                "seconds": round(gen.seconds, 1),
                "teacher seconds": round(gen.teacher_seconds, 1),
                "endpoints": ", ".join(f"{u}: {n}" for u, n in gen.endpoints.items()) or "-",
            }
        ],
    )
    # what `distill inspect` prints: coverage, entropy, k for 90/95/99% of the mass, sampled ranks
    create_table_artifact(
        key="dataset-inspect",
        description=f"distill inspect {gen.dataset_dir}",
        table=summary_rows(summarize(Path(gen.dataset_dir))),
    )


TASK_RUNNERS = ("thread", "ray")


def task_runner(kind: str = "thread", address: str | None = None):
    """The flow's task runner: a thread pool in this process (the default), or Ray (`prefect-ray`'s RayTaskRunner;
    `address` of a running cluster, or None to start a local one) to run served shards on other machines."""
    if kind == "thread":
        return ThreadPoolTaskRunner(max_workers=16)
    if kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise ConfigError(
                "--task-runner ray needs the prefect-ray package: pip install -e '.[ray]' (or pip install prefect-ray)"
            ) from None
        return RayTaskRunner(address=address) if address else RayTaskRunner()
    raise ConfigError(f"unknown task runner {kind!r}; choose from {', '.join(TASK_RUNNERS)}")


@flow(name="distill", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=16))
def distill_flow(cfg: RunConfig, stages: list[str] | None = None, resume: bool = False) -> RunOutput:
    """Run the requested stages (default: all) of one distillation run; returns per-stage results and timings."""
    stages = list(STAGES) if stages is None else stages
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ConfigError(f"unknown stage(s) {sorted(unknown)}; choose from {', '.join(STAGES)}")
    out = RunOutput(stages=list(stages))
    dataset_dir, student_dir = str(cfg.dataset_dir), str(cfg.student_dir)
    if "generate" in stages:
        t0 = time.perf_counter()
        out.generate = generate_dataset(cfg, executor=PrefectShards(), progress=False)
        out.seconds["generate"] = time.perf_counter() - t0
        dataset_artifacts(cfg, out.generate)
    if "train" in stages:
        t0 = time.perf_counter()
        out.train = train_task(cfg, dataset_dir, resume=resume)
        out.seconds["train"] = time.perf_counter() - t0
        student_dir = out.train.student_dir
    if "eval" in stages:
        t0 = time.perf_counter()
        out.eval = eval_task(cfg, dataset_dir, student_dir)
        out.seconds["eval"] = time.perf_counter() - t0
    for r in range(1, cfg.rounds):
        t0 = time.perf_counter()
        out.rounds.append(round_task(cfg, r, stages))
        out.seconds[f"round {r}"] = time.perf_counter() - t0
    if cfg.rounds > 1 and "eval" in stages:
        create_table_artifact(key="rounds", table=rounds_table(cfg), description="metrics per on-policy round")
    if cfg.rounds > 1:  # the last round's student is the run's result
        student_dir = str(student_of(cfg, cfg.rounds - 1))
    out.paths = {"dataset": dataset_dir, "student": student_dir, "metrics": str(cfg.metrics_path)}
    create_markdown_artifact(key="run-outputs", markdown="\n".join(f"- **{k}**: `{v}`" for k, v in out.paths.items()))
    get_run_logger().info("distill run %s finished: %s", cfg.name, out.seconds)
    return out
