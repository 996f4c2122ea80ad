"""The script a user would write instead of this pipeline: vLLM offline, top-k logprobs, one Parquet file.

    .venv-teacher/bin/python bench/plain_vllm.py --model M --prompts data/demo/prompts.jsonl --out OUT.parquet

Runs in the teacher environment (vLLM, numpy, pyarrow; not our package). `bench/capture.py --compare` runs it
beside `distill generate` and `distill run` on the same prompts and teacher. Prints one JSON line: seconds until
the engine was ready, seconds in `generate`, tokens, tokens/s of `generate`.
"""

import argparse
import json
import time

T0 = time.perf_counter()

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    ap.add_argument("--llm-kwargs", default="{}", help="JSON: more vllm.LLM arguments (e.g. dtype, max_model_len)")
    args = ap.parse_args()

    prompts = [json.loads(line)["prompt"] for line in open(args.prompts)][: args.limit]
    llm = LLM(model=args.model, max_logprobs=args.k, logprobs_mode="raw_logprobs", **json.loads(args.llm_kwargs))
    ready = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(logprobs=args.k, max_tokens=args.max_new_tokens, temperature=1.0))
    generated = time.perf_counter()

    ids, lps, tok_ids, offsets = [], [], [], [0]
    for out in outputs:
        comp = out.outputs[0]
        for position in comp.logprobs:
            top = sorted(position.items(), key=lambda e: -e[1].logprob)[: args.k]
            ids.extend(t for t, _ in top)
            lps.extend(lp.logprob for _, lp in top)
        tok_ids.append(comp.token_ids)
        offsets.append(offsets[-1] + len(comp.token_ids) * args.k)
    flat = pa.array(np.asarray(lps, np.float32))
    table = pa.table(
        {
            "prompt": prompts,
            "completion_token_ids": pa.array([list(t) for t in tok_ids], pa.list_(pa.int32())),
            "topk_token_ids": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(ids, pa.int32())),
            "topk_logprobs": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), flat),
        }
    )
    pq.write_table(table, args.out)
    tokens = sum(len(t) for t in tok_ids)
    done = time.perf_counter()
    print(
        json.dumps(
            {
                "ready_s": ready - T0,
                "generate_s": generated - ready,
                "total_s": done - T0,
                "tokens": tokens,
                "tokens_per_s": tokens / (generated - ready),
            }
        )
    )


if __name__ == "__main__":  # vLLM spawns its engine core: the main module must not run again there
    main()
