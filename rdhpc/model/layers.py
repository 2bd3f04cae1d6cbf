"""The building blocks of the recurrent-depth transformer, one class per component.

Shape legend: B batch, T sequence, H heads, D head dim, C hidden size (h in the paper).
Nothing here imports torch.distributed: parallelism is applied from outside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from rdhpc.model.config import ModelConfig


def at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """float32 for bf16/fp16/fp32 inputs; float64 stays float64 (exact reference checks)."""
    return torch.promote_types(dtype, torch.float32)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm in float32 that keeps for backward only its input, in the input's dtype, and the
    per-row rsqrt. Autograd through the plain ops would keep two float32 copies of the (B, T, C)
    activation per norm (the upcast input and the normalised product): at the 3.5B shape and 4096
    tokens 8 x 86.5 MB per sandwich block, 24 GiB over the 36 blocks a 24+8 step back-propagates."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        x32 = x.to(at_least_float32(x.dtype))
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        out = x32 * rstd
        if weight is not None:
            out = out * weight.to(x32.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return out.to(x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        x_hat = x.to(rstd.dtype) * rstd
        g = grad_out.to(rstd.dtype)
        grad_x = grad_weight = None
        if weight is not None:
            if ctx.needs_input_grad[1]:
                grad_weight = (g * x_hat).flatten(0, -2).sum(0).to(weight.dtype)
            g = g * weight.to(rstd.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = (rstd * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (eps 1e-6 in the 3.5B model). The output takes the promoted
    dtype of input and weight, as the released code's (`norm(x.float()).type_as(x) * weight`): a
    bf16 input with a float32 weight (bf16 autocast over float32 weights, the paper's precision)
    gives a float32 output, so the state stays float32; bf16 weights give bf16, float32 float32."""

    def __init__(self, dim: int, eps: float, learnable: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if learnable else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)

    def reset_parameters(self):
        if self.weight is not None:
            nn.init.ones_(self.weight)


def rope_table(head_dim: int, max_seq_len: int, base: float, device=None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """cos/sin of the RoPE angles, in float32 unless asked for float64: (max_seq_len, head_dim / 2, 2)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=dtype) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=dtype), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def _rotate_pairs(x_BTxD: torch.Tensor, table_T_D2_2: torch.Tensor, inverse: bool) -> torch.Tensor:
    x = x_BTxD.to(table_T_D2_2.dtype).unflatten(-1, (-1, 2))  # (B, T, ..., D/2, 2)
    x_even, x_odd = x[..., 0], x[..., 1]
    T, D2 = table_T_D2_2.shape[:2]
    shape = (1, T) + (1,) * (x_BTxD.dim() - 3) + (D2,)
    cos, sin = table_T_D2_2[..., 0].view(shape), table_T_D2_2[..., 1].view(shape)
    if inverse:
        sin = -sin
    rotated = torch.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], dim=-1)
    return rotated.flatten(-2).to(x_BTxD.dtype)


class _RoPEFunction(torch.autograd.Function):
    """A rotation is linear: its gradient is the inverse rotation of the incoming gradient, so
    backward needs only the table, not the float32 copy of q and k that autograd through the plain
    ops keeps (2 x 86.5 MB per attention layer at the 3.5B shape and 4096 tokens)."""

    @staticmethod
    def forward(ctx, x, table):
        ctx.save_for_backward(table)
        return _rotate_pairs(x, table, inverse=False)

    @staticmethod
    def backward(ctx, grad_out):
        table, = ctx.saved_tensors
        return _rotate_pairs(grad_out, table, inverse=True), None


def apply_rope(x_BTxD: torch.Tensor, table_T_D2_2: torch.Tensor) -> torch.Tensor:
    """Rotate ADJACENT pairs (2i, 2i+1) of the head dim, as the released model does (its complex-number
    layout), not the "rotate half" layout of Llama-style code. Computed in float32. `x` is (B, T, ..., D):
    q and k stacked as (B, T, 2, H, D) rotate in one pass (half the kernels of two calls in eager; one
    fused elementwise kernel under torch.compile either way)."""
    return _RoPEFunction.apply(x_BTxD, table_T_D2_2)


class Attention(nn.Module):
    """Causal multi-head attention with a fused [q; k; v] projection and the paper's qk_bias."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        C = config.hidden_size
        self.qkv = nn.Linear(C, 3 * C, bias=False)  # rows [q; k; v], each num_heads x head_dim
        self.proj = nn.Linear(C, C, bias=False)
        # [0] is added to q and [1] to k, before RoPE.
        self.qk_bias = nn.Parameter(torch.zeros(2, 1, config.num_heads, config.head_dim)) if config.qk_bias else None

    def forward(self, x_BTC: torch.Tensor, rope_T_D2_2: torch.Tensor, kv_cache=None) -> torch.Tensor:
        """`rope_T_D2_2` holds the rows of the T positions of x. Without `kv_cache` the T tokens
        attend causally among themselves (training). With one (incremental decoding), `kv_cache(k, v)`
        stores the new keys/values (B, T, H, D) and returns every key and value to attend to
        (B, H, S, D) and a boolean mask (T, S) or None (see rdhpc.generate)."""
        B, T, C = x_BTC.shape
        qkv = self.qkv(x_BTC).view(B, T, 3, self.num_heads, self.head_dim)
        # v copied out of the fused output: the attention kernel keeps v for backward, and a view
        # would keep all of q, k, v alive (87 MB more per layer at the 3.5B shape, 4096 tokens)
        qk, v = qkv[:, :, :2], qkv[:, :, 2].contiguous()  # (B, T, 2, H, D), (B, T, H, D)
        if self.qk_bias is not None:
            qk = qk + self.qk_bias.view(2, self.num_heads, self.head_dim).to(qk.dtype)
        q, k = apply_rope(qk, rope_T_D2_2).unbind(dim=2)
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        else:
            k_all, v_all, mask = kv_cache(k, v)
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k_all, v_all, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class _SiluMulFunction(torch.autograd.Function):
    """silu(gate) * up keeping only gate and up for backward (one view of the fc output) and
    recomputing silu(gate) there: autograd through the plain ops also keeps silu(gate), 73 MB per
    block at the 3.5B shape and 4096 tokens. The same operations as autograd's, so bit-identical."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad_out * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad_out * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


class GatedMLP(nn.Module):
    """silu(gate) * up with one fused input matrix whose rows are [gate; up]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(_SiluMulFunction.apply(gate, up))


class SandwichBlock(nn.Module):
    """y = n2(x + Attn(n1(x))); out = n4(y + MLP(n3(y))). The layout that made the 3.5B run stable."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        learnable = config.norm_type == "rmsnorm"
        self.norm_1, self.norm_2, self.norm_3, self.norm_4 = (
            RMSNorm(config.hidden_size, config.norm_eps, learnable) for _ in range(4))
        self.attn = Attention(config)
        self.mlp = GatedMLP(config)
        self.checkpoint_mlp = False  # set for core blocks by model.checkpoint_core_mlp

    def forward(self, x: torch.Tensor, rope: torch.Tensor, kv_cache=None) -> torch.Tensor:
        x = self.norm_2(x + self.attn(self.norm_1(x), rope, kv_cache))
        return self.norm_4(x + run_mlp(self, self.norm_3(x)))


class PreNormBlock(nn.Module):
    """x + Attn(n1(x)), then + MLP(n2(.)): the plain pre-norm ablation of the paper's failed runs."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        learnable = config.norm_type == "rmsnorm"
        self.norm_1 = RMSNorm(config.hidden_size, config.norm_eps, learnable)
        self.norm_2 = RMSNorm(config.hidden_size, config.norm_eps, learnable)
        self.attn = Attention(config)
        self.mlp = GatedMLP(config)
        self.checkpoint_mlp = False  # set for core blocks by model.checkpoint_core_mlp

    def forward(self, x: torch.Tensor, rope: torch.Tensor, kv_cache=None) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), rope, kv_cache)
        return x + run_mlp(self, self.norm_2(x))


def run_mlp(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The block's MLP, recomputed in backward (only h kept) when the block is marked for it."""
    if block.checkpoint_mlp and torch.is_grad_enabled():
        return checkpoint(block.mlp, h, use_reentrant=False)
    return block.mlp(h)


BLOCK_CLASSES = {"sandwich": SandwichBlock, "prenorm": PreNormBlock}
