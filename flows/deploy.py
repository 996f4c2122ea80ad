"""Deployments of the `distill` flow: one run config + stages on a cron or interval schedule, served locally.

The config travels as deployment parameters in its JSON form and the flow validates it into a
`RunConfig` when a run starts, so the UI shows (and lets you edit) every field. Relative paths in the
config resolve against the directory `distill schedule` was started from, as for `distill run`.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron, Interval, Schedule
from prefect.settings import PREFECT_API_URL

from flows.distill import distill_flow
from pipeline.config import RunConfig
from pipeline.core import UserError


class ScheduleError(UserError):
    """A schedule the user asked for cannot be built (bad cron, both or neither of cron/interval)."""


def make_schedule(cron: str | None = None, interval: float | None = None, timezone: str | None = None) -> Schedule:
    """Exactly one of a cron expression (UTC unless `timezone`) or an interval in seconds."""
    if (cron is None) == (interval is None):
        raise ScheduleError("give exactly one of --cron EXPR or --interval SECONDS")
    if interval is not None:
        if interval <= 0:
            raise ScheduleError(f"--interval must be a positive number of seconds, got {interval:g}")
        return Interval(datetime.timedelta(seconds=interval), timezone=timezone)
    try:
        return Cron(cron, timezone=timezone)
    except ValueError:
        raise ScheduleError(
            f'invalid cron expression {cron!r}: expected 5 fields, e.g. "0 3 * * *" (03:00 daily)'
        ) from None


def deployment_parameters(cfg: RunConfig, stages: Sequence[str]) -> dict:
    """The flow's parameters as JSON: the whole config (validated again by the flow) and the stages."""
    return {"cfg": cfg.model_dump(mode="json"), "stages": list(stages)}


def build_deployment(
    cfg: RunConfig, stages: Sequence[str], schedule: Schedule | None = None, name: str | None = None
) -> RunnerDeployment:
    """A deployment `distill/<name>` (default: the config's name) running `stages` of `cfg` on `schedule`."""
    return distill_flow.to_deployment(
        name=name or cfg.name,
        schedule=schedule,
        parameters=deployment_parameters(cfg, stages),
        tags=["distill"],
        description=f"distill run {cfg.name!r}: stages {', '.join(stages)}; outputs in {cfg.output_dir}",
    )


def require_server() -> str:
    """The API URL of a running Prefect server; schedules need one (the ephemeral API has no scheduler)."""
    url = PREFECT_API_URL.value()
    if not url:
        raise ScheduleError(
            "scheduling needs a Prefect server: run `prefect server start --host 127.0.0.1` and "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api`"
        )
    return url


def serve_deployment(deployment: RunnerDeployment) -> None:
    """Register the deployment and execute its runs in this process until Ctrl-C (schedule paused on exit).

    `limit=1`: runs of one config write the same output directory, so a run due while another is still
    going waits for it instead of racing it.
    """
    serve(deployment, limit=1)
