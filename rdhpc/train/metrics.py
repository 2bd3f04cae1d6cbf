"""Honest throughput: model FLOPs counted for the depth actually sampled in a step.

The paper's trainer logged MFU for the MEAN depth, so a step at r = 90 and one at r = 5 reported the
same FLOPs. Here a step with n iterations without gradient and k with gradient counts:
    prelude, coda, head:  forward + backward (3 x 2 flops per parameter per token)
    core and adapter:     forward for n + k iterations, backward for the last k (2 x 2 per parameter)
    attention scores:     4 * T * h per layer and token forward (QK^T and AV, full T: no causal discount,
                          the usual convention), x3 where the layer is back-propagated
No recompute is counted: activation checkpointing costs time, not model FLOPs.
"""

from __future__ import annotations

from rdhpc.model.config import ModelConfig


def _block_params(c: ModelConfig) -> int:
    return 4 * c.hidden_size ** 2 + 3 * c.hidden_size * c.intermediate_size


def flops_per_token(c: ModelConfig, seq_len: int, n_no_grad: int, n_grad: int) -> float:
    h = c.hidden_size
    attention_fwd = 4 * seq_len * h  # per layer per token
    outer_layers = c.num_prelude_layers + c.num_coda_layers
    outer = outer_layers * _block_params(c) + c.padded_vocab_size * h  # + the head (the embedding lookup is free)
    core = c.num_core_layers * _block_params(c) + (2 * h * h if c.injection_type == "linear" else 0)
    core_attention = c.num_core_layers * attention_fwd
    flops = 3 * (2 * outer + outer_layers * attention_fwd)  # forward + backward
    flops += (n_no_grad + n_grad) * (2 * core + core_attention)  # forward of every iteration
    flops += n_grad * 2 * (2 * core + core_attention)  # backward of the last k
    return float(flops)
