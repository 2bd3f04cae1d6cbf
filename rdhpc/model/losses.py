"""The training loss of the head without the (N, V) float32 logits: linear + cross-entropy in chunks.

At the 3.5B shape one micro-batch of 4096 tokens has 4096 x 65536 logits. The plain path
(`F.cross_entropy(F.linear(x, W).float(), y)`) holds the bf16 logits, their float32 copy, the float32
log-softmax saved for backward and, in backward, float32 and bf16 gradients of the logits: about
3.5 GiB at the peak. Here the forward walks over chunks of tokens; each chunk's logits exist only
while its loss and its gradient with respect to the logits are computed, and only that gradient is
kept for backward, in the dtype of x (0.5 GiB in bf16 at the 3.5B shape). Backward is then two full
GEMMs (dX = G W, dW = G^T X), so the weight gradient accumulates inside one GEMM, never in a
(V, C) float32 buffer over chunks. No logits are recomputed: the FLOPs are those of the plain path.

Shape legend: N tokens (B * T flattened), C hidden size, V vocabulary.
"""

from __future__ import annotations

import torch


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NC, weight_VC, labels_N, chunk_size: int, ignore_index: int):
        num_valid = (labels_N != ignore_index).sum()
        acc = torch.promote_types(x_NC.dtype, torch.float32)  # float32 for bf16 / fp32, float64 stays
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        loss_sum = torch.zeros((), device=x_NC.device, dtype=acc)
        grad_logits_NV = torch.empty((x_NC.shape[0], weight_VC.shape[0]), device=x_NC.device,
                                     dtype=x_NC.dtype) if need_grad else None
        for start in range(0, x_NC.shape[0], chunk_size):
            end = min(start + chunk_size, x_NC.shape[0])
            labels = labels_N[start:end]
            valid = labels != ignore_index
            safe = torch.where(valid, labels, 0).unsqueeze(1)
            logits = (x_NC[start:end] @ weight_VC.t()).to(acc)  # the plain path's rounding: x.dtype GEMM, then fp32
            lse = torch.logsumexp(logits, dim=-1)
            loss_sum = loss_sum + ((lse - logits.gather(1, safe).squeeze(1)) * valid).sum()
            if need_grad:
                # d(mean loss)/d logits = (softmax - onehot) / num_valid on valid rows, 0 elsewhere
                probs = logits.sub_(lse.unsqueeze(1)).exp_()
                probs.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=probs.dtype))
                probs.mul_((valid.to(acc) / num_valid.clamp_min(1).to(acc)).unsqueeze(1))
                grad_logits_NV[start:end] = probs
        ctx.save_for_backward(x_NC, weight_VC, grad_logits_NV)
        return loss_sum / num_valid  # NaN without a valid label, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss):
        x_NC, weight_VC, grad_logits_NV = ctx.saved_tensors
        scale = grad_loss.to(grad_logits_NV.dtype)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_logits_NV @ weight_VC) * scale
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_logits_NV.t() @ x_NC) * scale
        return grad_x, grad_weight, None, None, None


def linear_cross_entropy(x_NC: torch.Tensor, weight_VC: torch.Tensor, labels_N: torch.Tensor,
                         chunk_size: int, ignore_index: int = -100) -> torch.Tensor:
    """mean over labels != ignore_index of cross_entropy(x @ weight.T, labels), computed `chunk_size`
    tokens at a time; equal to the unchunked loss and its gradients within float rounding."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    device_type = x_NC.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        # what F.linear does under autocast, done once, not per chunk
        dtype = torch.get_autocast_dtype(device_type)
        x_NC, weight_VC = x_NC.to(dtype), weight_VC.to(dtype)
    return _LinearCrossEntropy.apply(x_NC, weight_VC, labels_N, chunk_size, ignore_index)
