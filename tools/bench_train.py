"""Training-step throughput: the DeepSpeed engine step users run, against a plain PyTorch step of the
same model on the same batches, in one process, at a fixed depth.

    python tools/bench_train.py --shape debug --steps 6 --warmup 2               # CPU, fp32, seconds
    python tools/bench_train.py --shape huginn-3.5b --seq-len 4096 --micro-batch 1 --depth 24,8 \\
        --plain eager --plain core --engine 'fast: train.compile=core model.loss_chunk_size=1024' \\
        --json out.json                                                          # one H200

Paths (each from the same initial weights, the same batches and the same initial-state noise per
step, so their losses must agree: exactly in fp32, within bf16 noise in bf16):
- `--plain eager|core|model`: forward, backward, gradient clipping and AdamW (fused on GPUs), no
  DeepSpeed; in bf16 the paper's recipe: float32 weights under bf16 autocast. `core` / `model`
  compile one core iteration / the whole forward (rdhpc.train.engine.compile_model).
- `--engine NAME[: KEY=VALUE ...]`: the trainer's engine step (rdhpc.train.engine.build_engine:
  ZeRO as configured, bf16 weights held by DeepSpeed, optimizer step included) with these config
  overrides on top of the common ones; repeatable. Default: one path `engine` as configured.

Each path: median of --steps warm steps (CUDA events on a GPU, perf_counter on the CPU), tokens/s,
model TFLOP/s (rdhpc.train.metrics.flops_per_token of the fixed depth; `*_causal`: attention counted
for its causal half, as the reference figures are), MFU against the device's peak
(rdhpc.train.metrics.peak_tflops), peak memory (torch.cuda.max_memory_allocated; on the CPU
only the process's peak resident memory, for all paths together), the loss of every step. The
model shape, optimizer and switches come from --config / --shape / --set (`--set` applies to every
path), exactly as `rdhpc train` reads them.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import engine_step, plain_step, single_rank_environment, time_steps  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="run config YAML (shape, optimizer, precision, switches); default: built-in defaults")
    p.add_argument("--shape", help="named model size: debug, rd-150m, rd-1b, huginn-3.5b (overrides the config's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every path, e.g. model.loss_chunk_size=1024 (repeatable)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the model's max_seq_len)")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--depth", default=None, help="iterations without,with gradient, e.g. 24,8 (default: mean - k, k)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per path (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator, cuBLAS)")
    p.add_argument("--precision", choices=["bf16", "fp32"], help="default: bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--plain", action="append", choices=["eager", "core", "model", "none"],
                   help="plain PyTorch paths (repeatable; default: eager; none: no plain path)")
    p.add_argument("--engine", action="append", metavar="NAME[: KEY=VALUE ...]",
                   help="an engine path with its own overrides (repeatable; default: 'engine' as configured)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every figure here")
    return p.parse_args(argv)


def engine_variants(specs) -> list[tuple[str, list[str]]]:
    """'fast: a=1 b=2' -> ('fast', ['a=1', 'b=2']); names are unique."""
    variants = []
    for spec in specs or ["engine"]:
        name, _, rest = spec.partition(":")
        name = name.strip()
        if not name or name in {v[0] for v in variants} or name.startswith("plain-"):
            raise SystemExit(f"--engine {spec!r}: give each engine path its own name (not plain-*)")
        variants.append((name, rest.split()))
    return variants


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(0)
    single_rank_environment(cpu=device.type == "cpu")

    from rdhpc.config import load_config
    from rdhpc.train.engine import (attention_kernels, build_engine, compile_model, quiet_deepspeed_deprecations,
                                    skip_deepspeed_shm_op)
    from rdhpc.train.metrics import flops_per_token, peak_tflops
    from rdhpc.train.optim import build_optimizer

    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    common = list(args.overrides)
    if args.shape:
        common.insert(0, f"model.size={args.shape}")
    base = load_config(args.config, common)
    seq_len = args.seq_len or base.model.max_seq_len
    forced = [f"model.max_seq_len={seq_len}", f"train.micro_batch_size={args.micro_batch}",
              f"train.global_batch_size={args.micro_batch}", f"train.precision={precision}",
              f"train.device={device.type}"]
    run = load_config(args.config, common + forced)
    k = run.model.mean_backprop_depth
    depth = tuple(int(x) for x in args.depth.split(",")) if args.depth else \
        (max(run.model.mean_recurrence - k, 0), min(run.model.mean_recurrence, k))
    if len(depth) != 2:
        raise SystemExit(f"--depth {args.depth!r}: expected N,K (iterations without, with gradient)")
    plains = [p for p in (args.plain or ["eager"]) if p != "none"]
    variants = engine_variants(args.engine)

    if device.type == "cpu":
        skip_deepspeed_shm_op()
    quiet_deepspeed_deprecations()
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False)

    tokens_per_step = args.micro_batch * seq_len
    flops_token = flops_per_token(run.model, seq_len, *depth)
    flops_token_causal = flops_per_token(run.model, seq_len, *depth, causal=True)  # the reference's convention
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peak, peak_source = peak_tflops(device, dtype, run.train.peak_tflops_per_device)
    gemm = None
    if device.type == "cuda":
        from rdhpc.distributed.preflight import timed_gemm_tflops

        gemm = timed_gemm_tflops(device, 8192, torch.bfloat16, repeats=10)

    # the batches: rows of seq_len + 1 random tokens, inputs = row[:-1], labels = row[1:]
    generator = torch.Generator().manual_seed(args.seed)
    rows = [torch.randint(0, run.model.vocab_size, (args.micro_batch, seq_len + 1), generator=generator)
            for _ in range(min(args.warmup + args.steps, 4))]
    batches = [[(r[:, :-1].to(device), r[:, 1:].to(device))] for r in rows]

    def build_model(model_config):
        from rdhpc.model import RecurrentDepthModel

        with torch.device("meta"):
            model = RecurrentDepthModel(model_config)
        model.to_empty(device=device)
        torch.manual_seed(args.seed)
        model.init_weights()  # on the device: seconds at 3.5B, and the same draw for every path
        return model

    def reseed(step):  # the same initial-state noise at step s of every path
        torch.manual_seed(args.seed * 100_003 + step)

    results = {}

    def measure(name, step_fn, sdpa_backend):
        if device.type == "cuda":
            torch.cuda.synchronize()
            allocated_before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        with attention_kernels(sdpa_backend):
            times, losses = time_steps(step_fn, args.warmup + args.steps, device, before_step=reseed)
        wall = time.perf_counter() - started
        median = statistics.median(times[args.warmup:])
        tflops = tokens_per_step * flops_token / median / 1e12
        tflops_causal = tokens_per_step * flops_token_causal / median / 1e12
        entry = {
            "step_s": median, "step_s_all": times, "first_step_s": times[0], "wall_s": wall,
            "tokens_per_s": tokens_per_step / median, "tflops": tflops, "mfu": tflops / peak,
            "tflops_causal": tflops_causal, "mfu_causal": tflops_causal / peak,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None,
            "allocated_before_gib": allocated_before / 2 ** 30 if device.type == "cuda" else None,
            "losses": [float(x) for x in losses],
        }
        results[name] = entry
        mem = f"{entry['peak_memory_gib']:.1f} GiB" if entry["peak_memory_gib"] is not None else "n/a"
        print(f"[bench] {name:<14} {1000 * median:9.1f} ms/step  {entry['tokens_per_s']:10,.0f} tok/s  "
              f"{tflops:8.3f} TFLOP/s  MFU {100 * entry['mfu']:5.1f}%  peak {mem}  loss {entry['losses'][0]:.4f}  "
              f"(first step {times[0]:.2f} s)", flush=True)

    def summarize() -> dict:
        """Every figure so far; written to --json after each path, so a run stopped by a time limit
        keeps the paths it finished."""
        names = list(results)
        first = {n: results[n]["losses"][0] for n in names}
        summary = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"cpu ({torch.get_num_threads()} threads)",
            "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "model": run.model.to_dict(), "precision": precision, "seq_len": seq_len, "micro_batch": args.micro_batch,
            "depth": list(depth), "steps": args.steps, "warmup": args.warmup,
            "tokens_per_step": tokens_per_step, "flops_per_token": flops_token,
            "flops_per_token_causal": flops_token_causal,
            "peak_tflops": peak, "peak_source": peak_source, "gemm_bf16_8192_tflops": gemm,
            "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "common_overrides": common, "paths": results,
            "speedup_vs": {ref: {n: results[ref]["step_s"] / results[n]["step_s"] for n in names} for ref in names},
            "first_loss_rel_diff": {n: abs(first[n] - first[names[0]]) / abs(first[names[0]]) for n in names},
        }
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
        return summary

    def release():  # what one path held, before the next builds its own
        summarize()
        gc.collect()
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for scope in plains:
        model = build_model(run.model)
        compile_model(model, None if scope == "eager" else scope, run.train.compile_backend)
        optimizer = build_optimizer(model, run.optim, device.type)
        autocast = torch.bfloat16 if precision == "bf16" else None
        measure(f"plain-{scope}", lambda s: plain_step(model, optimizer, batches[s % len(batches)], depth,
                                                        run.optim.grad_clip, autocast),
                run.train.sdpa_backend)
        model = optimizer = None
        release()

    for name, overrides in variants:
        variant = load_config(args.config, common + forced + overrides)  # a variant may change the precision
        model = build_model(variant.model)
        engine, _, ds_config = build_engine(variant, model, 1, device)
        engine.train()
        measure(name, lambda s: engine_step(engine, batches[s % len(batches)], depth), variant.train.sdpa_backend)
        results[name]["overrides"] = overrides
        results[name]["deepspeed_config"] = ds_config
        engine.destroy()
        model = engine = None
        release()

    summary = summarize()
    names = list(results)
    print(f"[bench] {tokens_per_step} tokens/step, depth {depth[0]}+{depth[1]}, {flops_token / 1e9:.3f} GFLOP/token, "
          f"MFU against {peak:.4g} TFLOP/s ({peak_source})" + (f"; bf16 8192^3 GEMM {gemm:.0f} TFLOP/s" if gemm else ""))
    for n in names[1:]:
        print(f"[bench] {n} / {names[0]}: {summary['speedup_vs'][names[0]][n]:.3f}x faster, first-step loss "
              f"differs by {summary['first_loss_rel_diff'][n]:.2e} (relative)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
