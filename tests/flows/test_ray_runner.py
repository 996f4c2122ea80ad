"""The flow's shards on Ray (`distill run --task-runner ray`): a local Ray cluster started by prefect-ray's
RayTaskRunner, its workers attached to a real vLLM server, writing the thread pool's shards byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core import sha256_file
from pipeline.dataset.validate import validate_dataset
from pipeline.teachers.managed import ManagedServer
from tests.helpers import needs_vllm, server_config

pytestmark = [pytest.mark.slow, needs_vllm, pytest.mark.usefixtures("prefect_api")]
ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
pytest.importorskip("prefect_ray", reason="the ray extra is not installed (pip install -e '.[ray]')")


def _shards(dataset_dir: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted((dataset_dir / "shards").iterdir())}


def test_ray_workers_attached_to_a_server_write_the_thread_pools_shards(make_config, tiny_teacher, tmp_path):
    from prefect_ray import RayTaskRunner

    from flows.distill import distill_flow

    server = ManagedServer(server_config(tiny_teacher), max_logprobs=20, log_path=tmp_path / "server.log")
    server.start()
    try:
        teacher = {**server_config(tiny_teacher, url=server.url, served_model_name=server.model_name).model_dump()}
        threads = make_config(out=tmp_path / "threads", teacher=teacher, generate={"shard_size": 16})
        on_ray = make_config(out=tmp_path / "ray", teacher=teacher, generate={"shard_size": 16})
        distill_flow(threads, stages=["generate"])

        # a local cluster of two CPUs and a small object store; its workers import `pipeline` from this checkout
        runner = RayTaskRunner(
            init_kwargs={
                "num_cpus": 2,
                "include_dashboard": False,
                "object_store_memory": 200 * 1024**2,
                "runtime_env": {"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}},
            }
        )
        state = distill_flow.with_options(task_runner=runner)(on_ray, stages=["generate"], return_state=True)
        out = state.result().generate
    finally:
        server.stop()
        if ray.is_initialized():
            ray.shutdown()
    assert out.shards_written == 6 and out.endpoints == {server.url: 6}
    assert _shards(on_ray.dataset_dir) == _shards(threads.dataset_dir)
    assert validate_dataset(on_ray.dataset_dir).complete
