"""What backward keeps of one training forward, counted on the meta device (no memory, no compute:
the 3.5B shape at 4096 tokens takes seconds on a laptop), by tensor shape and dtype.

    python tools/activation_memory.py --shape huginn-3.5b --seq-len 4096 --depth 24,8
    python tools/activation_memory.py --shape huginn-3.5b --depth 24,8 --set model.loss_chunk_size=1024 --json out.json

Every tensor autograd saves is counted once by its storage (views of one tensor share it);
parameters are left out (they are the model's state, not activations). Attention is counted as
FlashAttention keeps it (q, k, v, output and the per-row log-sum-exp), not as the meta device's
math fallback, which would keep the (T, T) scores. Weights in the precision of the engine path:
bf16 with --precision bf16, so the figures are those of `train.precision: bf16`, not of bf16
autocast over float32 weights. torch.compile may keep less (its partitioner recomputes cheap
element-wise results in backward).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _FlashLikeAttention:
    """scaled_dot_product_attention that saves for backward what FlashAttention saves."""

    @staticmethod
    def build():
        import torch

        class Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v):
                out = torch.empty_like(q)
                lse = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)  # (B, H, T)
                ctx.save_for_backward(q, k, v, out, lse)
                return out

            @staticmethod
            def backward(ctx, grad):
                q, k, v, _, _ = ctx.saved_tensors
                return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

        def sdpa(q, k, v, attn_mask=None, is_causal=False, **_):
            return Function.apply(q, k, v)

        return sdpa


def saved_activations(model_config, seq_len: int, micro_batch: int, depth, dtype) -> dict[tuple, int]:
    """{(shape, dtype name): bytes} of the tensors one forward saves for backward."""
    import torch

    import rdhpc.model.layers as layers
    from rdhpc.model import RecurrentDepthModel

    with torch.device("meta"):
        model = RecurrentDepthModel(model_config).to(dtype)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    ids = torch.zeros(micro_batch, seq_len, dtype=torch.long, device="meta")
    seen, by_kind = set(), defaultdict(int)

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in seen and storage._cdata not in params:
            seen.add(storage._cdata)
            by_kind[(tuple(t.shape), str(t.dtype).removeprefix("torch."))] += storage.nbytes()
        return t

    real_sdpa = layers.F.scaled_dot_product_attention
    layers.F.scaled_dot_product_attention = _FlashLikeAttention.build()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, num_steps=tuple(depth), labels=ids, return_logits=False)
    finally:
        layers.F.scaled_dot_product_attention = real_sdpa
    return dict(by_kind)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="huginn-3.5b")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--depth", default="24,8")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--json")
    args = p.parse_args(argv)
    import torch

    from rdhpc.config import load_config

    run = load_config(None, [f"model.size={args.shape}", f"model.max_seq_len={args.seq_len}", *args.overrides])
    depth = [int(x) for x in args.depth.split(",")]
    kinds = saved_activations(run.model, args.seq_len, args.micro_batch, depth,
                              torch.bfloat16 if args.precision == "bf16" else torch.float32)
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
