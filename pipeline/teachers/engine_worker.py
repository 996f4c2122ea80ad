"""vLLM's offline engine (`vllm.LLM`) behind a pipe: the worker process of the `vllm_engine` teacher backend.

    python engine_worker.py IN_FD OUT_FD LLM_KWARGS_JSON

Started by pipeline/teachers/vllm_engine.py from the teacher environment (through server_guard.py, so it
dies with `distill`); it imports only the standard library, numpy and vllm, because our package is not
installed there. It builds one `vllm.LLM`, says `ready`, then answers requests one at a time until `shutdown`
or the end of its input. Logs go to stdout/stderr (the caller's log file); the protocol uses two pipes.

Protocol (both directions): a message is an 8-byte little-endian length, a JSON header of that many bytes,
then the raw bytes of the arrays the header lists (`"arrays": [[name, dtype, shape], ...]`, C order).
A request's header holds `op` and its parameters; the reply holds `ok` and either arrays or `error` (one
line) and `kind` (`request`: the request is wrong, retrying will not help; `engine`: anything else).
Operations live in OPS; a new kind of request (e.g. scoring given completions with `prompt_logprobs`) is
one more entry there and one more method on the caller's side.

`generate`: arrays `prompt_tokens` (int32, all prompts concatenated), `prompt_lengths` (int64), `seeds`
(int64, one per prompt); params `n`, `temperature`, `top_p`, `max_tokens`, `k`. One SamplingParams per prompt
with its own seed (as the server backend sends one request per prompt), all in one `generate` call, so the
engine batches the whole shard continuously. Reply arrays, completions in prompt order then sample order:
`lengths` (int64 [C]), `finish_stop` (uint8 [C]), `token_ids` (int32 [T]) and `entry_ids` (int32 [T, k+1]),
`entry_logprobs` (float32 [T, k+1]): per generated token the sampled token first, then the raw top-k in rank
order, exactly as vLLM's flat logprobs hold them (the caller dedups and sorts, as for the server).

`score` (`generate.mode: rescore`): arrays `prompt_tokens` (each prompt and its given completion, one after the
other, all concatenated), `prompt_lengths` (int64: prompt + completion) and `completion_lengths` (int64); param
`k`. One prefill each (`prompt_logprobs=k`, `max_tokens=1`). Reply arrays over the completion positions only, in
order: `entry_ids` and `entry_logprobs` ([T, k+1]: the given token first, then the raw top-k in rank order).
"""

from __future__ import annotations

import json
import os
import struct
import sys
import traceback

import numpy as np

HEADER = struct.Struct("<Q")


def read_exact(f, size: int) -> bytearray:
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:  # a raw pipe may return less than asked
        n = f.readinto(view[got:])
        if not n:
            raise EOFError(f"pipe closed after {got} of {size} bytes")
        got += n
    return buf


def read_message(f) -> tuple[dict, dict[str, np.ndarray]]:
    (size,) = HEADER.unpack(read_exact(f, HEADER.size))
    header = json.loads(read_exact(f, size))
    arrays = {}
    for name, dtype, shape in header.get("arrays", []):
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        arrays[name] = np.frombuffer(read_exact(f, count * dt.itemsize), dt).reshape(shape)
    return header, arrays


def write_message(f, header: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
    arrays = {k: np.ascontiguousarray(v) for k, v in (arrays or {}).items()}
    header = {**header, "arrays": [[k, v.dtype.str, list(v.shape)] for k, v in arrays.items()]}
    body = json.dumps(header).encode()
    f.write(HEADER.pack(len(body)) + body)
    for v in arrays.values():
        f.write(memoryview(v).cast("B"))
    f.flush()


class RequestError(Exception):
    """The request cannot be served as asked (a setting is wrong)."""


def op_generate(llm, params: dict, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    k = int(params["k"])
    ends = np.cumsum(arrays["prompt_lengths"])
    flat = arrays["prompt_tokens"].tolist()
    starts = [0, *ends[:-1].tolist()]
    prompts = [TokensPrompt(prompt_token_ids=flat[a:b]) for a, b in zip(starts, ends.tolist())]
    try:
        sampling = [
            SamplingParams(
                n=int(params["n"]),
                temperature=float(params["temperature"]),
                top_p=float(params["top_p"]),
                top_k=0,
                min_p=0.0,
                repetition_penalty=1.0,
                max_tokens=int(params["max_tokens"]),
                seed=int(seed),
                logprobs=k,
                flat_logprobs=True,
                detokenize=False,
            )
            for seed in arrays["seeds"].tolist()
        ]
        outputs = llm.generate(prompts, sampling, use_tqdm=False)
    except ValueError as err:  # vLLM validates a request's settings with ValueError (e.g. logprobs > max)
        raise RequestError(str(err)) from None
    lengths, stops, token_ids, entry_ids, entry_lps = [], [], [], [], []
    for out in outputs:
        for comp in sorted(out.outputs, key=lambda c: c.index):
            lp = comp.logprobs
            count = len(comp.token_ids)
            if count and len(lp.token_ids) != count * (k + 1):
                raise RuntimeError(f"expected {k + 1} logprob entries per token, got {len(lp.token_ids)}/{count}")
            lengths.append(count)
            stops.append(comp.finish_reason == "stop")
            token_ids.append(np.asarray(comp.token_ids, np.int32))
            entry_ids.append(np.asarray(lp.token_ids, np.int32))
            entry_lps.append(np.asarray(lp.logprobs, np.float32))
    cat = lambda parts, dt: np.concatenate(parts).astype(dt, copy=False) if parts else np.zeros(0, dt)
    return {
        "lengths": np.asarray(lengths, np.int64),
        "finish_stop": np.asarray(stops, np.uint8),
        "token_ids": cat(token_ids, np.int32),
        "entry_ids": cat(entry_ids, np.int32).reshape(-1, k + 1),
        "entry_logprobs": cat(entry_lps, np.float32).reshape(-1, k + 1),
    }


def op_score(llm, params: dict, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    k = int(params["k"])
    ends = np.cumsum(arrays["prompt_lengths"])
    flat = arrays["prompt_tokens"].tolist()
    starts = [0, *ends[:-1].tolist()]
    prompts = [TokensPrompt(prompt_token_ids=flat[a:b]) for a, b in zip(starts, ends.tolist())]
    scoring = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, flat_logprobs=True, detokenize=False)
    try:
        outputs = llm.generate(prompts, scoring, use_tqdm=False)
    except ValueError as err:
        raise RequestError(str(err)) from None
    entry_ids, entry_lps = [], []
    for out, total, count in zip(outputs, arrays["prompt_lengths"].tolist(), arrays["completion_lengths"].tolist()):
        lp = out.prompt_logprobs  # position i: the prompt token i first, then the top-k predicting it
        lo, hi = lp.start_indices[total - count], lp.end_indices[total - 1]
        if hi - lo != count * (k + 1):
            raise RuntimeError(f"expected {k + 1} prompt logprob entries per completion token, got {hi - lo}/{count}")
        entry_ids.append(np.asarray(lp.token_ids[lo:hi], np.int32))
        entry_lps.append(np.asarray(lp.logprobs[lo:hi], np.float32))
    cat = lambda parts, dt: np.concatenate(parts).astype(dt, copy=False) if parts else np.zeros(0, dt)
    return {
        "entry_ids": cat(entry_ids, np.int32).reshape(-1, k + 1),
        "entry_logprobs": cat(entry_lps, np.float32).reshape(-1, k + 1),
    }


OPS = {"generate": op_generate, "score": op_score}


def one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:500]


def main(argv: list[str]) -> int:
    inp = os.fdopen(int(argv[0]), "rb")
    out = os.fdopen(int(argv[1]), "wb")
    kwargs = json.loads(argv[2])
    import vllm

    llm = vllm.LLM(**kwargs)
    write_message(
        out,
        {
            "op": "ready",
            "ok": True,
            "vllm": vllm.__version__,
            "vocab_size": int(llm.llm_engine.model_config.get_vocab_size()),
        },
    )
    while True:
        try:
            header, arrays = read_message(inp)
        except EOFError:
            return 0  # the caller closed the pipe: it is done with us
        op = header.get("op")
        if op == "shutdown":
            return 0
        try:
            if op not in OPS:
                raise RequestError(f"unknown operation {op!r}; this worker knows {sorted(OPS)}")
            reply = OPS[op](llm, header.get("params", {}), arrays)
            write_message(out, {"op": op, "ok": True}, reply)
        except RequestError as err:
            write_message(out, {"op": op, "ok": False, "kind": "request", "error": str(err)})
        except Exception as err:  # reported to the caller in one line; the traceback goes to the log
            traceback.print_exc()
            sys.stderr.flush()
            write_message(out, {"op": op, "ok": False, "kind": "engine", "error": one_line(err)})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
