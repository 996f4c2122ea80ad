"""Training-step throughput and peak memory: CE-only vs CE+KD for each divergence kind, and the top-k loss plus
each live-teacher family (feature, attention, relation, all three).

Each variant runs in a fresh subprocess on the same synthetic batch shape (a Llama student with a
realistic 32k vocabulary, k=20 cached teacher top-k), through the library's own step
(`pipeline.train.loss_sums` -> `combine` -> backward -> AdamW). A `naive` row runs the textbook
version (full B x T x V logits, then the divergence) for reference. Peak memory is the growth over
the resident set right before the timed steps: on CPU VmHWM after resetting it through
/proc/self/clear_refs (with glibc's mmap threshold fixed so freed tensors leave the RSS), on CUDA
torch.cuda.max_memory_allocated.

The live rows run the teacher's forward on every step (`pipeline.live.teacher.teacher_states`, no grad) beside the
student's step; the teacher is a random Llama twice the student's width and depth on the same vocabulary, or with
`--pair demo` the demo teacher and the demo's shrunk student (287-token vocabulary). `teacher ms` is the teacher's
forward alone, so its share of the step is the price of a live family.

    python bench/train_step.py                      # table + bench/results/train_step.json
    python bench/train_step.py --steps 5 --vocab 8000   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "ce_only": {"alpha": 1.0, "kind": "forward_kl", "tail_bucket": False},
    "forward_kl": {"alpha": 0.2, "kind": "forward_kl", "tail_bucket": False},
    "reverse_kl": {"alpha": 0.2, "kind": "reverse_kl", "tail_bucket": False},
    "jsd": {"alpha": 0.2, "kind": "jsd", "tail_bucket": False},
    "forward_kl+tail": {"alpha": 0.2, "kind": "forward_kl", "tail_bucket": True},
    "naive forward_kl": {"alpha": 0.2, "kind": "forward_kl", "tail_bucket": False, "naive": True},
    "fkl+feature": {"alpha": 0.2, "kind": "forward_kl", "tail_bucket": False, "live": {"feature": 1.0}},
    "fkl+attention": {"alpha": 0.2, "kind": "forward_kl", "tail_bucket": False, "live": {"attention": 1.0}},
    "fkl+relation": {"alpha": 0.2, "kind": "forward_kl", "tail_bucket": False, "live": {"relation": 1.0}},
    "fkl+all three": {
        "alpha": 0.2,
        "kind": "forward_kl",
        "tail_bucket": False,
        "live": {"feature": 1.0, "attention": 1.0, "relation": 1.0},
    },
}
LIVE = [name for name, v in VARIANTS.items() if "live" in v]
DEFAULT = ["ce_only", "forward_kl", "reverse_kl", "jsd", "forward_kl+tail", "naive forward_kl"]


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _llama(args, hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=hidden,
            intermediate_size=hidden * 8 // 3,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 64,
            num_key_value_heads=hidden // 64,
            max_position_embeddings=args.seq,
        )
    )


def _models(args, live: bool, device):
    """(student, teacher or None): the random pair (the teacher twice as wide and deep), or the demo's pair."""
    import torch

    teacher_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.pair == "demo":
        from pipeline.config import load_config
        from pipeline.models import build_student, load_causal_lm

        cfg = load_config(ROOT / "configs" / "demo.yaml")
        student = build_student(cfg.student, cfg.teacher.model, seed=0)
        teacher = load_causal_lm(cfg.teacher.model, device="cpu") if live else None
        args.vocab = student.config.vocab_size
    else:
        student = _llama(args, args.hidden, args.layers)
        teacher = _llama(args, 2 * args.hidden, 2 * args.layers) if live else None
    if teacher is not None:
        teacher = teacher.to(device, dtype=teacher_dtype).eval().requires_grad_(False)
    return student.to(device), teacher


def run_variant(name: str, args) -> dict:
    """One variant in this process: build, warm up, then time `args.steps` steps and record peak memory."""
    import torch

    from pipeline.config import TrainConfig
    from pipeline.dataset.batch import Batch
    from pipeline.live.plan import make_plan
    from pipeline.live.teacher import LiveTeacher, combine_live, teacher_states
    from pipeline.losses import LossSums, combine, topk_divergence
    from pipeline.train import DistillObjective, loss_sums, make_optimizer

    v = VARIANTS[name]
    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    live = v.get("live", {})
    model, teacher = _models(args, bool(live), device)
    t = TrainConfig(
        alpha=v["alpha"],
        kind=v["kind"],
        tail_bucket=v["tail_bucket"],
        loss_chunk_size=args.chunk,
        live_teacher=bool(live),
        **{family: {"weight": w} for family, w in live.items()},
    )
    objective = DistillObjective(model, t, make_plan(t, model, teacher) if live else None).to(device)
    lt = LiveTeacher(teacher, objective.plan) if live else None
    opt = make_optimizer(objective, t, device)
    B, T, P, k = args.batch, args.seq, args.prompt, args.k
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, args.vocab, (B, T), generator=g)
    loss_mask = torch.zeros(B, T, dtype=torch.bool)
    loss_mask[:, P - 1 : T - 1] = True
    n = int(loss_mask.sum())
    teacher_logits = torch.randn(n, args.vocab, generator=g) * 3
    topk_lp, topk_ids = torch.log_softmax(teacher_logits, -1).topk(min(k, args.vocab), -1)
    del teacher_logits
    batch = Batch(
        input_ids, torch.ones(B, T, dtype=torch.long), loss_mask, input_ids[:, P:].reshape(-1), topk_ids, topk_lp
    ).to(device)
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    teacher_times = []

    def step() -> None:
        with amp:
            if v.get("naive"):
                logits = (
                    model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
                    .logits[batch.loss_mask]
                    .float()
                )
                ce = torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum")
                kd = topk_divergence(logits, batch.topk_ids, batch.topk_logprobs, kind=t.kind).sum()
                sums, live_sums = LossSums(ce, kd, n), None
            elif live:
                t0 = time.perf_counter()
                states = teacher_states(lt, batch)
                sync()
                teacher_times.append(time.perf_counter() - t0)
                ce, kd, live_sums = objective(
                    batch.input_ids,
                    batch.attention_mask,
                    batch.loss_mask,
                    batch.labels,
                    batch.topk_ids,
                    batch.topk_logprobs,
                    states,
                )
                sums = LossSums(ce, kd, n)
            else:
                sums, live_sums = loss_sums(model, batch, t), None
        loss, _, _ = combine(sums, alpha=t.alpha, temperature=t.temperature, n_tokens_global=n)
        if live_sums is not None:
            loss = loss + combine_live(live_sums, t, n_tokens_global=n, n_batches_global=1)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(objective.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    teacher_times.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_kib("VmHWM") * 1024
    med = statistics.median(times)
    return {
        "variant": name,
        "tokens_per_step": n,
        "median_step_s": med,
        "tokens_per_s": n / med,
        "step_times_s": times,
        "peak_step_bytes": peak - base,
        "teacher_forward_s": statistics.median(teacher_times) if teacher_times else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--chunk", type=int, default=1024, help="train.loss_chunk_size")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--variants", nargs="*", default=DEFAULT, choices=list(VARIANTS))
    ap.add_argument("--live", action="store_true", help="the live-teacher rows (and forward_kl, their baseline)")
    ap.add_argument("--pair", choices=["random", "demo"], default="random", help="demo: the demo teacher and student")
    ap.add_argument("--out", type=Path, default=Path("bench/results/train_step.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # child process: one variant, result as JSON on stdout
        print(json.dumps(run_variant(args.one, args)))
        return
    if args.live:
        args.variants = ["forward_kl", *LIVE]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
    rows = []
    for name in args.variants:
        cmd = [sys.executable, __file__, "--one", name, *sys.argv[1:]]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"  {name}: {rows[-1]['tokens_per_s']:.0f} tok/s", file=sys.stderr)
    ce = next((r for r in rows if r["variant"] == ("forward_kl" if args.live else "ce_only")), None)
    pair = "demo pair (configs/demo.yaml)" if args.pair == "demo" else f"vocab {args.vocab}, hidden {args.hidden}"
    print(
        f"\ntraining step, {args.device}: {pair}, {args.layers} layers, batch "
        f"{args.batch}x{args.seq}, "
        f"k={args.k}, loss chunk {args.chunk}, median of {args.steps} steps"
    )
    base = "fkl" if args.live else "CE"
    print(
        f"{'variant':18s} {'tok/s':>9s} {'vs ' + base:>7s} {'step ms':>8s} {'teacher ms':>10s} {'peak MiB':>9s} "
        f"{'vs ' + base:>7s}"
    )
    for r in rows:
        r["speed_vs_ce"] = r["tokens_per_s"] / ce["tokens_per_s"] if ce else None
        r["memory_vs_ce"] = r["peak_step_bytes"] / ce["peak_step_bytes"] if ce and ce["peak_step_bytes"] > 0 else None
        fmt = lambda x: "" if x is None else f"{x:.2f}x"
        teacher_ms = "" if r.get("teacher_forward_s") is None else f"{r['teacher_forward_s'] * 1e3:.1f}"
        print(
            f"{r['variant']:18s} {r['tokens_per_s']:9.0f} {fmt(r['speed_vs_ce']):>7s} {r['median_step_s'] * 1e3:8.1f} "
            f"{teacher_ms:>10s} {r['peak_step_bytes'] / 2**20:9.1f} {fmt(r['memory_vs_ce']):>7s}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "one"}
    args.out.write_text(json.dumps({"settings": meta, "machine": platform.platform(), "rows": rows}, indent=1))
    print(f"\nwrote {args.out}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
