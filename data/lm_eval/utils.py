"""The demo's lm-evaluation-harness tasks read the JSONL beside this file, wherever the harness runs from."""

import json
from pathlib import Path

import datasets

DOCS = Path(__file__).with_name("demo_sort.jsonl")


def load_docs(**_metadata) -> datasets.DatasetDict:
    """The shipped rows as the task's test split (`pipeline.demo.task.write_benchmark_jsonl` wrote them)."""
    rows = [json.loads(line) for line in DOCS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def answer_is_valid(doc: dict, results: list[str]) -> dict[str, float]:
    """1 when the generated completion is a valid answer to the prompt (the demo task's own checker)."""
    from pipeline.demo.task import check

    return {"acc": float(check(doc["prompt"], results[0]))}
