"""Shape and variant of a recurrent-depth model, and the table of named sizes.

The model package is self-contained: this dataclass is what the model needs and nothing more.
The project-wide YAML configuration (rdhpc.config) embeds it as its `model` section.

Variant names are exact strings, checked by `ModelConfig.problems()` when a config is loaded, and
each maps to one small piece of code (never a substring test deep inside the forward pass).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from rdhpc.validation import check_bounds, check_choice

# name -> what it selects. The first entry of each table is the published design.
BLOCK_TYPES = {
    "sandwich": "four RMSNorms per block: n2(x + Attn(n1(x))), n4(y + MLP(n3(y))) (the 3.5B run)",
    "prenorm": "plain pre-norm block x + Attn(n(x)), x + MLP(n(x)) (failed run: the latent state was ignored)",
}
INJECTION_TYPES = {
    "linear": "s_i = R(A([s_{i-1} ; e])), A a bias-free linear map 2h -> h (the 3.5B run)",
    "add": "s_i = R(s_{i-1} + e), no adapter (failed run: representation collapse)",
}
NORM_TYPES = {
    "rmsnorm": "RMSNorm with a learned weight, computed in float32 (the 3.5B run)",
    "rmsnorm-parameter-free": "RMSNorm without weight (failed run, together with additive injection)",
}
SAMPLING_SCHEMES = {
    "poisson-lognormal": "r = Poisson(exp(tau)) + 1, tau ~ N(log(mean) - sigma^2/2, sigma) (the 3.5B run)",
    "fixed": "r = mean_recurrence on every step",
}
NO_GRAD_MODES = {
    "no_grad": "torch.no_grad() around the iterations without gradient",
    "inference_mode": "torch.inference_mode() around them (no version counters or view tracking); the state "
                      "leaving them is copied into a normal tensor",
}
INIT_STRATEGIES = {
    "takase": "truncated normal std sqrt(2/(5h)); output projections / sqrt(2 L), L = P + R * mean + C",
}


@dataclass
class ModelConfig:
    """A recurrent-depth transformer: prelude P, core R iterated r times, coda C."""

    size: str | None = None
    """Named size from MODEL_SIZES this config started from (the fields below override it)."""
    vocab_size: int = 65536
    """Vocabulary of the tokenizer; the embedding is padded up to a multiple of `padding_multiple`."""
    padding_multiple: int = 4096
    """Round the embedding rows up to this multiple (4096 in the released model)."""
    hidden_size: int = 5280
    """Width h of the residual stream and of the latent state."""
    num_heads: int = 55
    """Attention heads; full multi-head (as many key/value heads as query heads)."""
    intermediate_size: int = 17920
    """Width of the gated SiLU MLP (one fused h -> 2 * intermediate_size input matrix)."""
    num_prelude_layers: int = 2
    num_core_layers: int = 4
    num_coda_layers: int = 2
    max_seq_len: int = 4096
    """Longest sequence (positions of the RoPE table); training rows hold max_seq_len + 1 tokens."""
    mean_recurrence: int = 32
    """Mean number of core iterations r (training depth distribution, default inference depth)."""
    mean_backprop_depth: int = 8
    """k: only the last k core iterations of a training step build an autograd graph."""
    recurrence_sigma: float = 0.5
    """Standard deviation of the log-normal in the log-normal Poisson depth sampler."""
    sampling_scheme: str = "poisson-lognormal"
    rope_base: float = 50000.0
    norm_eps: float = 1e-6
    qk_bias: bool = True
    """Learned bias (2, 1, heads, head_dim) added to q and k before RoPE, zero at init."""
    tie_embeddings: bool = True
    block_type: str = "sandwich"
    injection_type: str = "linear"
    norm_type: str = "rmsnorm"
    init_strategy: str = "takase"
    activation_checkpointing: bool = False
    """Recompute each core iteration in the backward pass instead of storing its activations."""
    checkpoint_core_mlp: bool = False
    """Selective checkpointing: recompute only the MLP of each core block in the backward pass
    (its input is kept; the (tokens, 2 x intermediate) and (tokens, intermediate) tensors are not),
    the largest activations for about a third of the core's forward FLOPs again."""
    loss_chunk_size: int = 0
    """Tokens per chunk of the fused head + cross-entropy of the training loss (rdhpc.model.losses):
    the (tokens, vocabulary) float32 logits are never materialised. 0: the plain head and
    F.cross_entropy. Used only when the forward returns no logits (training and validation)."""
    no_grad_mode: str = "no_grad"
    """How the iterations without gradient run: 'no_grad' or 'inference_mode'."""
    hoist_injection: bool = False
    """Compute the e-half of the adapter, A_e e, once per forward instead of A [s ; e] at every
    iteration (the same function up to float rounding; -0.23 TFLOP per iteration use at the 3.5B
    shape and 4096 tokens). Training only; the adapter's weight is read directly (not ZeRO 3)."""

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.padding_multiple) * self.padding_multiple

    @property
    def num_stored_layers(self) -> int:
        return self.num_prelude_layers + self.num_core_layers + self.num_coda_layers

    @property
    def effective_depth(self) -> int:
        """Layers traversed at the mean recurrence: P + R * mean + C (132 for the 3.5B model)."""
        return self.num_prelude_layers + self.num_core_layers * self.mean_recurrence + self.num_coda_layers

    @property
    def init_std(self) -> float:
        return math.sqrt(2.0 / (5.0 * self.hidden_size))

    @property
    def out_proj_init_std(self) -> float:
        return self.init_std / math.sqrt(2.0 * self.effective_depth)

    @property
    def embedding_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    # ---- validation ---------------------------------------------------------------------------
    def problems(self, prefix: str = "model") -> list[str]:
        """Every inconsistency of this config, as messages naming the key; empty when valid."""
        out = check_bounds(self, prefix, positive=(
            "vocab_size", "padding_multiple", "hidden_size", "num_heads", "intermediate_size", "num_core_layers",
            "max_seq_len", "mean_recurrence", "rope_base", "norm_eps"), non_negative=(
            "num_prelude_layers", "num_coda_layers", "mean_backprop_depth", "recurrence_sigma", "loss_chunk_size"))
        # far beyond any model anyone trains: a typo (an extra digit, a float's exponent) is named here,
        # not found by torch as an allocation that overflows
        for name, limit in (("vocab_size", 1 << 24), ("hidden_size", 1 << 20), ("intermediate_size", 1 << 22),
                            ("num_heads", 1 << 12), ("num_prelude_layers", 1 << 10), ("num_core_layers", 1 << 10),
                            ("num_coda_layers", 1 << 10), ("max_seq_len", 1 << 24), ("mean_recurrence", 1 << 14),
                            ("mean_backprop_depth", 1 << 14), ("padding_multiple", 1 << 16)):
            if getattr(self, name) > limit:
                out.append(f"{prefix}.{name}: {getattr(self, name)} is beyond any sensible model (at most {limit})")
        if self.num_heads > 0 and self.hidden_size % self.num_heads:
            out.append(f"{prefix}.hidden_size: {self.hidden_size} is not divisible by "
                       f"{prefix}.num_heads = {self.num_heads}")
        elif self.num_heads > 0 and self.hidden_size > 0 and self.head_dim % 2:
            out.append(f"{prefix}.num_heads: head_dim = hidden_size / num_heads = {self.head_dim} "
                       "must be even (RoPE rotates pairs)")
        for name, table in (("block_type", BLOCK_TYPES), ("injection_type", INJECTION_TYPES),
                            ("norm_type", NORM_TYPES), ("sampling_scheme", SAMPLING_SCHEMES),
                            ("init_strategy", INIT_STRATEGIES), ("no_grad_mode", NO_GRAD_MODES)):
            out += check_choice(self, prefix, name, table)
        if self.size is not None and self.size not in MODEL_SIZES:
            out.append(f"{prefix}.size: unknown size {self.size!r}; choose one of {sorted(MODEL_SIZES)}")
        if self.checkpoint_core_mlp and self.activation_checkpointing:
            out.append(f"{prefix}.checkpoint_core_mlp: redundant with {prefix}.activation_checkpointing "
                       "(which recomputes whole core iterations); choose one")
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The table of named sizes. Each entry lists only what differs from the ModelConfig defaults,
# which are the released 3.5B shape.
MODEL_SIZES: dict[str, dict] = {
    # Tests and CI: a few hundred thousand parameters, seconds per step on a CPU.
    "debug": dict(vocab_size=512, padding_multiple=64, hidden_size=64, num_heads=4, intermediate_size=128,
                  num_prelude_layers=1, num_core_layers=2, num_coda_layers=1, max_seq_len=128,
                  mean_recurrence=4, mean_backprop_depth=2),
    # About 140M stored parameters (65536 vocabulary), for ablations on a node.
    "rd-150m": dict(hidden_size=896, num_heads=14, intermediate_size=2560, max_seq_len=2048,
                    mean_recurrence=16, mean_backprop_depth=4),
    # About 960M stored parameters.
    "rd-1b": dict(hidden_size=2560, num_heads=20, intermediate_size=9216, mean_recurrence=32),
    # Exactly the released Huginn shape (3,564,976,800 parameters).
    "huginn-3.5b": dict(),
}


def model_config_from_size(size: str, **overrides) -> ModelConfig:
    if size not in MODEL_SIZES:
        raise KeyError(f"unknown model size {size!r}; choose one of {sorted(MODEL_SIZES)}")
    return ModelConfig(size=size, **{**MODEL_SIZES[size], **overrides})
