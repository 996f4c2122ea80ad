"""Per-module mutation scores from mutmut's results in mutants/ (`make mutation` prints them; docs/testing.md).

score = detected / checked, detected = killed or timed out (an infinite loop the tests notice); survivors and
mutants no selected test reaches ("no tests") count against it. Modules with no mutant checked yet are left out.

    .venv/bin/python bench/mutation_scores.py [--survivors]
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout"}
STATUS.update({-24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", 37: "killed"})


def scores(root: Path = Path("mutants")) -> dict[str, Counter]:
    out = {}
    for meta in sorted(root.rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        counts = Counter(STATUS.get(c, "suspicious") for c in codes.values() if c is not None)
        if counts:
            out[str(meta.relative_to(root)).removesuffix(".meta")] = counts
    return out


def main() -> None:
    print(f"{'module':32} {'checked':>7} {'killed':>6} {'timeout':>7} {'survived':>8} {'no tests':>8} {'score':>6}")
    for module, c in scores().items():
        checked = sum(v for k, v in c.items() if k != "skipped")
        detected = c["killed"] + c["timeout"]
        print(
            f"{module:32} {checked:7} {c['killed']:6} {c['timeout']:7} {c['survived']:8} {c['no tests']:8}"
            f" {detected / checked:6.1%}"
        )
    if "--survivors" in sys.argv:
        for meta in sorted(Path("mutants").rglob("*.py.meta")):
            for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
                if STATUS.get(code) in ("survived", "no tests"):
                    print(STATUS[code], name)


if __name__ == "__main__":
    main()
