"""The `distill` Prefect flow: generate -> train -> eval, each stage calling the plain stage functions.

Tasks pass paths and hashes, never models or tables. Generation fans out as one task per shard (a fixed
slice of prompts), cached on the teacher + prompts + sampling key (`generate_key`) and the shard index,
with results persisted; the flow body alone commits finished shards to the manifest, so concurrent
shards never race on it. A rerun that changes only training settings, or `stages=["train", "eval"]`,
submits no shard task and never starts the teacher.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.runtime import task_run as current_task_run
from prefect.client.orchestration import get_client
from prefect.context import TaskRunContext
from prefect.exceptions import ObjectNotFound
from prefect.futures import as_completed
from prefect.states import State
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline.config import RunConfig
from pipeline.dataset.stats import summarize, summary_rows
from pipeline.dataset.schema import SHARDS_DIR, ShardInfo, shard_name
from pipeline.dataset.writer import commit_shard, remove_stray_files
from pipeline.evaluate import evaluate
from pipeline.generate import GeneratePlan, generate_shard, open_manifest, prepare_dataset, shard_is_intact
from pipeline.teachers import TeacherInfo, load_teacher
from pipeline.train import train_student

STAGES = ("generate", "train", "eval")
TEACHER_TAG = "distill-teacher"
"""Tag of the shard tasks; a Prefect concurrency limit on it caps the shards calling teachers at once."""


def _retry_on_infrastructure(task, task_run, state) -> bool:
    """Retry crashes and connection trouble, not user errors (bad input fails the same way again)."""
    try:
        state.result()
    except ValueError:
        return False
    except Exception:
        return True
    return False


def _open_teacher(cfg: RunConfig, endpoint: str | None, served_model_name: str | None):
    if endpoint is None:  # hf: the model is loaded in this process
        return load_teacher(cfg.teacher, workdir=Path(cfg.output_dir), k=cfg.generate.k)
    attach = cfg.teacher.model_copy(update={"url": endpoint, "urls": [], "num_servers": 1,
                                            "served_model_name": served_model_name or cfg.teacher.served_model_name})
    return load_teacher(attach, k=cfg.generate.k)


@task(name="generate-shard", tags=[TEACHER_TAG], persist_result=True, retries=2, retry_delay_seconds=10,
      retry_condition_fn=_retry_on_infrastructure, task_run_name="generate-shard-{index}",
      cache_key_fn=lambda ctx, params: f"distill-shard-{params['key']}-{params['index']}")
def shard_task(cfg: RunConfig, key: str, index: int, endpoints: list[str], served_model_name: str | None = None) -> dict:
    """The teacher completes shard `index` and its file is written; the flow commits it to the manifest.

    `key` is `generate_key(cfg)`: with the index it is the cache key. Endpoints are not part of it; shard i
    goes to endpoints[i % n] and each retry moves on to the next server.
    """
    attempt = TaskRunContext.get().task_run.run_count
    endpoint = endpoints[(index + max(attempt, 1) - 1) % len(endpoints)] if endpoints else None
    start = time.perf_counter()
    teacher = _open_teacher(cfg, endpoint, served_model_name)
    try:
        info = generate_shard(cfg, index, teacher)
    finally:
        teacher.close()
    return {"shard": info.model_dump(), "teacher": asdict(teacher.info), "endpoint": endpoint or "in-process",
            "seconds": time.perf_counter() - start}


@contextmanager
def teacher_endpoints(cfg: RunConfig) -> Iterator[tuple[list[str], str | None]]:
    """(server URLs, served model name) for the shard tasks: attached, or managed servers started here and
    always stopped; ([], None) for the in-process hf backend."""
    t = cfg.teacher
    if t.backend != "vllm_server":
        yield [], None
    elif t.endpoints():
        yield t.endpoints(), t.served_model_name
    else:
        from pipeline.teachers.vllm_server import managed_servers

        with managed_servers(t, count=t.num_servers, max_logprobs=max(cfg.generate.k, 20), workdir=Path(cfg.output_dir)) as servers:
            yield [s.url for s in servers], servers[0].model_name


def ensure_teacher_limit(slots: int) -> int:
    """Create the tag concurrency limit on teacher calls (one slot per endpoint) unless an operator set one;
    returns the limit in force."""
    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(f"tag:{TEACHER_TAG}").limit
        except ObjectNotFound:
            client.create_concurrency_limit(tag=TEACHER_TAG, concurrency_limit=slots)
            return slots


def _shard_states(cfg: RunConfig, plan: GeneratePlan, endpoints: list[str], served: str | None) -> Iterator[tuple[int, State]]:
    """Run the plan's shard tasks and yield (index, final state) as they finish.

    A cached result can only be right if its file is still there, so shards without a file skip the
    cache (the flow validates the others before trusting them). hf shards run one after another (one
    model in this process) without the teacher tag; served shards are submitted to the task runner, spread
    over the endpoints and capped by the tag's concurrency limit.
    """
    def options(index: int):
        orphan = (plan.dataset_dir / SHARDS_DIR / shard_name(index)).is_file()
        return shard_task.with_options(refresh_cache=not orphan)

    if not endpoints:  # no tag: one model in this process, shards in sequence; a slot would cost ~2 s a shard
        for index in plan.todo:
            yield index, options(index).with_options(tags=set())(cfg, plan.fingerprint, index, [], None, return_state=True)
        return
    futures = {options(i).submit(cfg, plan.fingerprint, i, endpoints, served): i for i in plan.todo}
    for future in as_completed(list(futures)):
        future.wait()  # sets the future's final state; `.state` alone may re-read it from the API
        yield futures[future], future.state


def _generate(cfg: RunConfig) -> dict:
    """Fan the remaining shards out to shard tasks and commit each one as it finishes (this thread only)."""
    logger = get_run_logger()
    start = time.perf_counter()
    plan = prepare_dataset(cfg)
    ran, cached, per_endpoint, teacher_seconds, errors = 0, 0, Counter(), 0.0, []
    started = not plan.complete
    if started:
        with teacher_endpoints(cfg) as (endpoints, served):
            slots = ensure_teacher_limit(max(1, len(endpoints)))
            logger.info("%d shard(s) to generate over %d endpoint(s), concurrency limit tag:%s = %d",
                        len(plan.todo), len(endpoints), TEACHER_TAG, slots)
            for index, state in _shard_states(cfg, plan, endpoints, served):
                if state.is_failed() or state.is_crashed():
                    errors.append(state)
                    continue
                result = state.result()
                info = ShardInfo(**result["shard"])
                if state.name == "Cached" and not shard_is_intact(plan.dataset_dir, info):
                    logger.warning("cached shard %d does not match its file; generating it again", index)
                    state = shard_task.with_options(refresh_cache=True)(cfg, plan.fingerprint, index, endpoints, served,
                                                                        return_state=True)
                    result, info = state.result(), ShardInfo(**state.result()["shard"])
                is_cached = state.name == "Cached"
                cached, ran = cached + is_cached, ran + (not is_cached)
                teacher_seconds += 0.0 if is_cached else result["seconds"]
                per_endpoint[result["endpoint"]] += not is_cached
                manifest = open_manifest(cfg, plan, TeacherInfo(**result["teacher"]))
                commit_shard(plan.dataset_dir, manifest, info)
                logger.info("committed shard %d/%d (%d samples%s)", index + 1, plan.num_shards, info.rows,
                            ", cached" if is_cached else f", {result['endpoint']}")
        if errors:
            errors[0].result()  # raises the first failed shard's error; committed shards stay for a rerun
        remove_stray_files(plan.dataset_dir, plan.manifest)
    manifest = plan.manifest
    return {"dataset_dir": str(plan.dataset_dir), "generate_fingerprint": plan.fingerprint, "shards_written": ran,
            "shards_cached": cached, "samples": manifest.total_samples, "tokens": manifest.total_tokens,
            "seconds": time.perf_counter() - start, "teacher_seconds": teacher_seconds, "teacher_loaded": started,
            "cached": ran == 0, "endpoints": dict(per_endpoint)}


@task(name="train", retries=1, retry_delay_seconds=5, retry_condition_fn=_retry_on_infrastructure)
def train_task(cfg: RunConfig, dataset_dir: str, resume: bool = False) -> dict:
    """Student trains on the dataset's training split; a retry (or `resume`) continues from the last checkpoint."""
    resume = resume or current_task_run.run_count > 1
    result = train_student(cfg, dataset_dir=Path(dataset_dir), resume=resume)
    create_table_artifact(key="training-metrics", description=f"student {result.student_dir}",
                          table=[{k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(result).items()}])
    log = json.loads((Path(result.student_dir) / "train_log.json").read_text())
    create_table_artifact(key="training-curve", description="loss parts and throughput per logged step",
                          table=[{k: round(v, 5) if isinstance(v, float) else v for k, v in h.items()} for h in log["history"]])
    curve = (Path(result.student_dir) / "loss_curves.png").resolve()
    create_link_artifact(key="loss-curves", link=curve.as_uri(), link_text=f"loss curves ({curve})",
                         description="PNG of CE, KD and total loss against steps, written beside the student")
    return asdict(result)


@task(name="eval")
def eval_task(cfg: RunConfig, dataset_dir: str, student_dir: str) -> dict:
    """Student vs teacher on held-out prompts."""
    metrics = evaluate(cfg, dataset_dir=Path(dataset_dir), student_dir=Path(student_dir))
    rows = [{"model": who, **{k: round(v, 5) if isinstance(v, float) else v for k, v in metrics[who].items()}}
            for who in ("teacher", "student")]
    create_table_artifact(key="evaluation", table=rows, description="held-out evaluation")
    return metrics


@flow(name="distill", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=16))
def distill_flow(cfg: RunConfig, stages: list[str] = list(STAGES), resume: bool = False) -> dict:
    """Run the requested stages of one distillation run; returns per-stage results and timings."""
    logger = get_run_logger()
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; choose from {', '.join(STAGES)}")
    out: dict = {"stages": list(stages), "seconds": {}}
    dataset_dir, student_dir = str(cfg.dataset_dir), str(cfg.student_dir)
    if "generate" in stages:
        t0 = time.perf_counter()
        gen = out["generate"] = _generate(cfg)
        out["seconds"]["generate"] = time.perf_counter() - t0
        t = cfg.teacher
        create_table_artifact(key="dataset-summary", description=f"dataset {dataset_dir}", table=[
            {"samples": gen["samples"], "tokens": gen["tokens"], "shards generated": gen["shards_written"],
             "shards cached": gen["shards_cached"], "k": cfg.generate.k, "teacher": t.model, "backend": t.backend,
             "temperature": cfg.generate.temperature, "seconds": round(gen["seconds"], 1),
             "teacher seconds": round(gen["teacher_seconds"], 1),
             "endpoints": ", ".join(f"{u}: {n}" for u, n in gen["endpoints"].items()) or "-"}])
        # what `distill inspect` prints: coverage, entropy, k for 90/95/99% of the mass, sampled ranks
        create_table_artifact(key="dataset-inspect", description=f"distill inspect {dataset_dir}",
                              table=summary_rows(summarize(Path(dataset_dir))))
    if "train" in stages:
        t0 = time.perf_counter()
        out["train"] = train_task(cfg, dataset_dir, resume=resume)
        out["seconds"]["train"] = time.perf_counter() - t0
        student_dir = out["train"]["student_dir"]
    if "eval" in stages:
        t0 = time.perf_counter()
        out["eval"] = eval_task(cfg, dataset_dir, student_dir)
        out["seconds"]["eval"] = time.perf_counter() - t0
    paths = {"dataset": dataset_dir, "student": student_dir, "metrics": str(cfg.metrics_path)}
    create_markdown_artifact(key="run-outputs", markdown="\n".join(f"- **{k}**: `{v}`" for k, v in paths.items()))
    out["paths"] = paths
    logger.info("distill run %s finished: %s", cfg.name, out["seconds"])
    return out
