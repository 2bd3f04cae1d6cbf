"""What backward keeps of one training forward, counted on the meta device (no memory, no compute:
the 3.5B shape at 4096 tokens takes seconds on a laptop), by tensor shape and dtype.

    python tools/activation_memory.py --shape huginn-3.5b --seq-len 4096 --depth 24,8
    python tools/activation_memory.py --shape huginn-3.5b --depth 24,8 --set model.loss_chunk_size=1024 --json out.json

The measurement is rdhpc.plan.saved_activations, the one `rdhpc plan` adds up: every tensor
autograd saves is counted once by its storage (views of one tensor share it); parameters are left
out (they are the model's state, not activations). Attention is counted as FlashAttention keeps it
(q, k, v, output and the per-row log-sum-exp), not as the meta device's math fallback, which would
keep the (T, T) scores. --precision is train.precision: bf16 weights, float32 weights, or float32
weights under bf16 autocast (emulated: autocast ignores the meta device). torch.compile may keep
less (its partitioner recomputes cheap element-wise results in backward).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="huginn-3.5b")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--depth", default="24,8")
    p.add_argument("--precision", choices=["bf16", "fp32", "bf16-autocast"], default="bf16")
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--json")
    args = p.parse_args(argv)
    from rdhpc.config import load_config
    from rdhpc.plan import saved_activations

    run = load_config(None, [f"model.size={args.shape}", f"model.max_seq_len={args.seq_len}", *args.overrides])
    depth = [int(x) for x in args.depth.split(",")]
    kinds = saved_activations(run.model, args.seq_len, args.micro_batch, depth, args.precision)
    total = sum(kinds.values())
    print(f"saved for backward: {total / 2 ** 30:.2f} GiB ({args.shape}, {args.micro_batch} x {args.seq_len} tokens, "
          f"depth {depth[0]}+{depth[1]}, {args.precision} weights{', ' + ' '.join(args.overrides) if args.overrides else ''})")
    for (shape, dtype), size in sorted(kinds.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {size / 2 ** 30:8.2f} GiB  {dtype:9s} {shape}")
    if args.json:
        Path(args.json).write_text(json.dumps({"total_bytes": total, "by_kind": [
            {"shape": list(s), "dtype": d, "bytes": b} for (s, d), b in sorted(kinds.items(), key=lambda kv: -kv[1])]},
            indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
