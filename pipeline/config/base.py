"""What every config section shares: the one-line error, strict models, the stable hash of a key."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict

from pipeline.core import UserError

STAGES = ("generate", "train", "eval")
"""The stages of a run, in order; `distill run --stages` picks a subset."""


class ConfigError(UserError):
    """A configuration problem, stated in one line for the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
