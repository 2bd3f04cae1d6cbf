"""Causal attention forward + backward through each of PyTorch's scaled_dot_product_attention kernels
at the model's attention shape: which one `train.sdpa_backend` should name on this machine.

    python tools/bench_attention.py --heads 55 --seq-len 4096 --head-dim 96 --json attn.json   # 3.5B shape, GPU
    python tools/bench_attention.py --heads 4 --seq-len 128 --head-dim 16                        # CPU, seconds

Each kernel: median of --repeats timed forward + backward passes (CUDA events on a GPU), TFLOP/s
counting the causal half only (forward 2 B H T^2 D, backward 2.5x the forward), and the relative
difference of its output and input gradients from the first kernel that ran. A kernel this machine
or PyTorch build lacks (cuDNN on ROCm or the CPU, ...) is reported as unavailable, not as a failure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import time_steps  # noqa: E402

BACKENDS = ["auto", "cudnn", "flash", "efficient", "math"]  # auto: what PyTorch picks by itself


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=55)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--head-dim", type=int, default=96)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--json")
    args = p.parse_args(argv)
    import torch
    import torch.nn.functional as F

    from rdhpc.train.engine import attention_kernels

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    B, H, T, D = args.batch, args.heads, args.seq_len, args.head_dim
    g = torch.Generator(device=device).manual_seed(0)
    # (B, T, H, D) memory transposed to (B, H, T, D), as the model hands them over
    q, k, v = (torch.randn(B, T, H, D, device=device, dtype=dtype, generator=g).transpose(1, 2).requires_grad_()
               for _ in range(3))
    upstream = torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g)
    flops = 2 * B * H * T * T * D * 3.5  # forward (causal half) + backward at 2.5x
    results, reference = {}, None
    for backend in args.backends.split(","):
        def step(_):
            with attention_kernels(backend):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            grads = torch.autograd.grad(out, (q, k, v), upstream)
            return out.detach(), grads

        try:
            times, outputs = time_steps(step, 2 + args.repeats, device)
        except RuntimeError as exc:
            results[backend] = {"available": False, "error": str(exc).splitlines()[0][:300]}
            print(f"[attention] {backend:<9} unavailable: {results[backend]['error']}")
            continue
        median = statistics.median(times[2:])
        out, grads = outputs[-1]
        entry = {"available": True, "ms": 1000 * median, "tflops": flops / median / 1e12}
        if reference is None:
            reference = (backend, out, grads)
        else:
            def rel(a, b):
                return ((a.float() - b.float()).norm() / b.float().norm()).item()

            entry["rel_diff_vs"] = reference[0]
            entry["rel_diff_out"] = rel(out, reference[1])
            entry["rel_diff_grads"] = max(rel(a, b) for a, b in zip(grads, reference[2]))
        results[backend] = entry
        print(f"[attention] {backend:<9} {entry['ms']:8.2f} ms fwd+bwd  {entry['tflops']:7.1f} TFLOP/s"
              + (f"  rel. diff vs {entry['rel_diff_vs']}: out {entry['rel_diff_out']:.1e}, grads "
                 f"{entry['rel_diff_grads']:.1e}" if "rel_diff_vs" in entry else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": [B, H, T, D], "dtype": "bfloat16", "device": str(device),
                                               "torch": torch.__version__, "backends": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
