"""The recurrent-depth language model (Geiping et al. 2025, "Huginn"):

    e   = Prelude(embedding(x) * sqrt(h))
    s_0 ~ TruncNormal(0, sqrt(2/(5h))) * sqrt(h) * init_scale        (fresh at every forward)
    s_i = Core(Adapter([s_{i-1} ; e]))                               i = 1 .. r
    p   = Coda(ln_f(s_r));   logits = head(ln_f(p))                   (ln_f applied twice, head tied)

Training runs the first n iterations without gradient and the last k with it (truncated
backpropagation); the depth r = n + k is drawn per optimizer step by rdhpc.model.sampling.

Shape legend: B batch, T sequence, C hidden size, V padded vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from rdhpc.model.config import ModelConfig
from rdhpc.model.layers import BLOCK_CLASSES, RMSNorm, at_least_float32, rope_table
from rdhpc.model.losses import linear_cross_entropy

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, T, V)
    loss: torch.Tensor | None  # scalar mean cross-entropy over labels != IGNORE_INDEX
    latent_state: torch.Tensor  # (B, T, C): s_r, the state after the last core iteration
    num_steps: tuple[int, int]  # (iterations without gradient, iterations with gradient) actually run
    previous_state: torch.Tensor | None = None  # s_{r-1}, for the convergence diagnostic |s_r - s_{r-1}| / |s_r|
    depth_losses: dict[int, torch.Tensor] | None = None  # readout_depths: {r: summed token loss at depth r}
    num_label_tokens: torch.Tensor | None = None  # readout_depths: labels counted in each summed loss
    # readout_depths with readout_logits: {r: (N, V) float32 logits at the N labelled positions, in
    # row-major order}: what task scoring reads (log-likelihoods, argmax, KL between depths)
    depth_logits: dict[int, torch.Tensor] | None = None


def _trunc_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-3 * std, b=3 * std)


class RecurrentDepthModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        problems = config.problems()
        if problems:
            raise ValueError("invalid model config:\n  " + "\n  ".join(problems))
        self.config = config
        C, V = config.hidden_size, config.padded_vocab_size
        Block = BLOCK_CLASSES[config.block_type]
        self.embedding = nn.Embedding(V, C)
        self.prelude = nn.ModuleList(Block(config) for _ in range(config.num_prelude_layers))
        self.adapter = nn.Linear(2 * C, C, bias=False) if config.injection_type == "linear" else None
        self.core = nn.ModuleList(Block(config) for _ in range(config.num_core_layers))
        for block in self.core:
            block.checkpoint_mlp = config.checkpoint_core_mlp
        self.coda = nn.ModuleList(Block(config) for _ in range(config.num_coda_layers))
        self.final_norm = RMSNorm(C, config.norm_eps, learnable=config.norm_type == "rmsnorm")
        # A tied head reuses embedding.weight through F.linear, so the weight is one parameter,
        # counted and sharded once (what ZeRO-3 and the released checkpoint expect).
        self.lm_head = None if config.tie_embeddings else nn.Linear(C, V, bias=False)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ---- initialisation -------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self):
        """The "takase" scheme of the paper, all truncated at +-3 std (h = hidden size,
        L = P + R * mean_recurrence + C the effective depth):

        | weight                                   | init                          | 3.5B value |
        |------------------------------------------|-------------------------------|------------|
        | embedding, qkv, MLP fc, adapter, lm_head | N(0, sqrt(2/(5h)))            | 8.704e-3   |
        | attention proj, MLP proj (block outputs) | N(0, sqrt(2/(5h)) / sqrt(2L)) | 5.357e-4   |
        | norm weights                             | 1                             |            |
        | qk_bias                                  | 0                             |            |

        Call after building on the meta device and moving to a real one (`to_empty`); seed with
        torch.manual_seed for a reproducible draw.
        """
        std, out_std = self.config.init_std, self.config.out_proj_init_std
        trunc = _trunc_normal_

        trunc(self.embedding.weight, std)
        if self.adapter is not None:
            trunc(self.adapter.weight, std)
        if self.lm_head is not None:
            trunc(self.lm_head.weight, std)
        for block in (*self.prelude, *self.core, *self.coda):
            trunc(block.attn.qkv.weight, std)
            trunc(block.mlp.fc.weight, std)
            trunc(block.attn.proj.weight, out_std)
            trunc(block.mlp.proj.weight, out_std)
            if block.attn.qk_bias is not None:
                block.attn.qk_bias.zero_()
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.reset_parameters()

    # ---- forward --------------------------------------------------------------------------------
    def resolve_num_steps(self, num_steps) -> tuple[int, int]:
        """None -> the mean recurrence; an int r -> (max(r - k, 0), min(r, k)) with k the backprop
        depth; a pair (n, k) is taken as given. The trainer passes pairs drawn by DepthSampler."""
        if num_steps is None:
            num_steps = self.config.mean_recurrence
        if isinstance(num_steps, torch.Tensor):
            num_steps = num_steps.tolist()
        if isinstance(num_steps, int):
            if num_steps < 1:
                raise ValueError(f"num_steps must be >= 1, got {num_steps}")
            with_grad = min(num_steps, self.config.mean_backprop_depth)
            return num_steps - with_grad, with_grad
        n_no_grad, n_grad = (int(s) for s in num_steps)
        if n_no_grad < 0 or n_grad < 0 or n_no_grad + n_grad < 1:
            raise ValueError(f"num_steps (without grad, with grad) must be >= 0 with a positive sum, got {num_steps}")
        return n_no_grad, n_grad

    def initial_state(self, like: torch.Tensor, init_scale: float = 1.0, state_seeds=None) -> torch.Tensor:
        """s_0: truncated normal of std sqrt(2/(5h)), times the embedding scale (effective std
        sqrt(2/5)); init_scale=0 gives the zero state that makes the forward deterministic.
        `state_seeds` (one int per row): row b's noise comes from a generator seeded with
        state_seeds[b] alone, whatever else is in the batch; None draws from the global generator."""
        if init_scale == 0:
            return torch.zeros_like(like)
        state = torch.empty(like.shape, device=like.device, dtype=torch.float32)
        if state_seeds is None:
            _trunc_normal_(state, self.config.init_std)
        else:
            if len(state_seeds) != like.shape[0]:
                raise ValueError(f"{len(state_seeds)} state seeds for a batch of {like.shape[0]} rows")
            for row, seed in zip(state, state_seeds):
                generator = torch.Generator(device=like.device).manual_seed(int(seed))
                nn.init.trunc_normal_(row, mean=0.0, std=self.config.init_std, a=-3 * self.config.init_std,
                                      b=3 * self.config.init_std, generator=generator)
        return (state * (self.config.embedding_scale * init_scale)).to(like.dtype)

    def rope(self, num_positions: int, device) -> torch.Tensor:
        """The RoPE table of positions 0 .. num_positions - 1, float32 (float64 for a float64 model)."""
        return rope_table(self.config.head_dim, num_positions, self.config.rope_base, device=device,
                          dtype=at_least_float32(self.embedding.weight.dtype))

    def embed(self, input_ids: torch.Tensor, rope: torch.Tensor, kv_caches=None) -> torch.Tensor:
        """e = P(embedding(x) * sqrt(h)). `kv_caches`: one per prelude block (incremental decoding)."""
        x = self.embedding(input_ids) * self.config.embedding_scale
        for i, block in enumerate(self.prelude):
            x = block(x, rope, None if kv_caches is None else kv_caches[i])
        return x

    def core_iteration(self, state: torch.Tensor, embedded: torch.Tensor, rope: torch.Tensor,
                       kv_caches=None, injected: torch.Tensor | None = None) -> torch.Tensor:
        """One application of the recurrent core: s_i = R(A([s_{i-1} ; e])). `injected`: A_e e, the
        half of A([s ; e]) that is the same at every iteration, computed once (see `injection`)."""
        if self.adapter is not None and injected is not None:
            x = F.linear(state, self.adapter.weight[:, :self.config.hidden_size]) + injected
        elif self.adapter is not None:
            x = self.adapter(torch.cat([state, embedded], dim=-1))
        else:
            x = state + embedded
        for i, block in enumerate(self.core):
            x = block(x, rope, None if kv_caches is None else kv_caches[i])
        return x

    def decode(self, state: torch.Tensor, rope: torch.Tensor, kv_caches=None) -> torch.Tensor:
        """ln_f(C(ln_f(s))): the coda, the input of the head, (B, T, C)."""
        x = self.final_norm(state)
        for i, block in enumerate(self.coda):
            x = block(x, rope, None if kv_caches is None else kv_caches[i])
        return self.final_norm(x)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embedding.weight if self.lm_head is None else self.lm_head.weight

    def readout(self, state: torch.Tensor, rope: torch.Tensor, kv_caches=None) -> torch.Tensor:
        """logits = head(ln_f(C(ln_f(s)))): the coda and the tied head, (B, T, V)."""
        return F.linear(self.decode(state, rope, kv_caches), self.head_weight)

    def injection(self, embedded: torch.Tensor) -> torch.Tensor | None:
        """A_e e (the e-columns of the adapter applied to e) when model.hoist_injection asks for it:
        A [s ; e] = A_s s + A_e e, and A_e e is loop-invariant, so each iteration multiplies by an
        (h, h) matrix instead of (h, 2h) and concatenates nothing. None otherwise."""
        if not self.config.hoist_injection or self.adapter is None:
            return None
        return F.linear(embedded, self.adapter.weight[:, self.config.hidden_size:])

    def iterate(self, state, embedded, rope, num_steps: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(s_r, s_{r-1}) after n_no_grad + n_grad iterations."""
        n_no_grad, n_grad = num_steps
        previous = state
        injected = self.injection(embedded)
        # The no-grad iterations keep no activations; only the last n_grad build a graph, so
        # memory grows with k, not with the sampled depth.
        inference = self.config.no_grad_mode == "inference_mode" and n_no_grad > 0
        with torch.inference_mode() if inference else torch.no_grad():
            for _ in range(n_no_grad):
                previous, state = state, self.core_iteration(state, embedded, rope, None, injected)
        if inference:
            # Tensors made under inference mode can never be saved for backward: what leaves it
            # becomes a normal tensor (one (B, T, C) copy each).
            previous, state = previous.clone(), state.clone()
        for _ in range(n_grad):
            if self.config.activation_checkpointing and torch.is_grad_enabled():
                previous, state = state, checkpoint(self.core_iteration, state, embedded, rope, None, injected,
                                                    use_reentrant=False)
            else:
                previous, state = state, self.core_iteration(state, embedded, rope, None, injected)
        return state, previous

    def forward(self, input_ids: torch.Tensor, num_steps=None, labels: torch.Tensor | None = None,
                init_scale: float = 1.0, input_states: torch.Tensor | None = None,
                return_logits: bool = True, readout_depths: list[int] | None = None,
                state_seeds=None, readout_logits: bool = False) -> ModelOutput:
        """`readout_depths` (evaluation, needs labels, runs without gradient): the loss at each of
        these depths from ONE trajectory: the core runs to the deepest, the coda and head read the
        state out at each requested depth; `num_steps` is then ignored; `readout_logits` adds the
        logits at the labelled positions. `state_seeds`: per-row seeds of the initial-state noise
        (see `initial_state`)."""
        B, T = input_ids.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len = {self.config.max_seq_len}")
        rope = self.rope(T, input_ids.device)
        embedded = self.embed(input_ids, rope)
        state = input_states if input_states is not None else self.initial_state(embedded, init_scale, state_seeds)
        if readout_depths:
            return self._losses_by_depth(state, embedded, rope, labels, readout_depths, readout_logits)
        steps = self.resolve_num_steps(num_steps)
        state, previous = self.iterate(state, embedded, rope, steps)
        hidden = self.decode(state, rope)  # (B, T, C)
        logits = loss = None
        if labels is not None and not return_logits and self.config.loss_chunk_size > 0:
            loss = linear_cross_entropy(hidden.flatten(0, 1), self.head_weight, labels.flatten(),
                                        self.config.loss_chunk_size, IGNORE_INDEX)
        else:
            logits = F.linear(hidden, self.head_weight)  # (B, T, V)
            if labels is not None:
                loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        return ModelOutput(logits if return_logits else None, loss, state, steps, previous)

    @torch.no_grad()
    def _losses_by_depth(self, state, embedded, rope, labels, depths, with_logits: bool = False) -> ModelOutput:
        if labels is None:
            raise ValueError("readout_depths needs labels")
        wanted = set(int(d) for d in depths)
        deepest = max(wanted)
        if min(wanted) < 1:
            raise ValueError(f"readout depths must be >= 1, got {depths}")
        injected = self.injection(embedded)
        losses, previous, label_logits = {}, state, {}
        labelled = labels != IGNORE_INDEX
        for depth in range(1, deepest + 1):
            previous, state = state, self.core_iteration(state, embedded, rope, None, injected)
            if depth not in wanted:
                continue
            logits = F.linear(self.decode(state, rope), self.head_weight)
            losses[depth] = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                                            reduction="sum")
            if with_logits:
                label_logits[depth] = logits[labelled].float()
        count = labelled.sum()
        return ModelOutput(None, losses[deepest] / count.clamp_min(1), state, (deepest, 0), previous,
                           depth_losses=losses, num_label_tokens=count, depth_logits=label_logits or None)

    # ---- bookkeeping ----------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """Stored parameters by part; `recurrent` is the core, `unrolled(r)` counts it r times."""
        def count(modules):
            return sum(p.numel() for m in modules if m is not None for p in m.parameters())
        counts = {
            "embedding": self.embedding.weight.numel(),
            "prelude": count(self.prelude),
            "adapter": count([self.adapter]),
            "core": count(self.core),
            "coda": count(self.coda),
            "final_norm": count([self.final_norm]),
            "lm_head": count([self.lm_head]),
        }
        counts["total"] = sum(p.numel() for p in self.parameters())
        assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
        return counts

    def unrolled_parameters(self, depth: int) -> int:
        """Parameters traversed per token at recurrence depth r (core and adapter counted r times)."""
        c = self.parameter_counts()
        return c["total"] + (depth - 1) * (c["core"] + c["adapter"])
