"""Text generation with a recurrent-depth model: a KV cache across the recurrence, per-token early
exit, a fixed-size shared cache, warm-started latent states, greedy or sampled decoding.

    rdhpc generate runs/x/checkpoints --prompt "def main(" --steps 32 --max-new-tokens 64
    rdhpc generate huginn/ --prompt "..." --steps 32 --exit-threshold 5e-4 --cache-slots 4 --warm-start \\
        --temperature 0.8 --top-p 0.95 --seed 1

The prompt is processed in one pass at the full depth (every prompt token at every iteration, as in
the model's forward); then one token per step:

    e   = Prelude(token)                               (prelude blocks: one cache slot)
    s_0 = previous token's final state (warm start) or the initial state (zero by default)
    s_i = Core(A([s_{i-1} ; e]))  i = 1 .. r           (core block j, iteration i: cache slot i mod k)
    logits = head(Coda(s_r))                           (coda blocks: one cache slot)

Early exit (`exit_threshold`): after every iteration from the second on, the coda and head read the
state out and a token stops iterating once KL(p_i || p_{i-1}) < threshold (the paper uses 5e-4, the
released code 1e-3). Cache slots a token did not reach are filled with its deepest entry, so later
tokens attend to the deepest entry available for an exited token. With `cache_slots = k` iteration i
reads and writes slot i mod k: the cache holds k entries per core block whatever the depth. Rows of
a batch exit independently (an exited row keeps its state and its cache entries).

Prompts of different lengths share a batch by LEFT padding: every attention masks the padding keys
of its row (a padding query sees only itself, so no row of scores is empty), and since rotary
attention depends only on the distance between positions, each row computes what it would alone.

Shape legend: B batch, T new tokens, L cache positions, S slots, H heads, D head dim, C hidden, V vocab.
"""

from __future__ import annotations

import math

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from rdhpc.errors import UserError
from rdhpc.model.recurrent_depth import RecurrentDepthModel
from rdhpc.model.sampling import GENERATION_NOISE, row_noise_seeds


class GenerationError(UserError, ValueError):
    pass


@dataclass
class GenerationConfig:
    num_steps: int = 32
    """Recurrence depth r of every token (the maximum when exiting early)."""
    max_new_tokens: int = 64
    exit_threshold: float | None = None
    """KL divergence between successive steps' output distributions below which a token stops
    iterating; None runs every token at the full depth."""
    cache_slots: int | None = None
    """k: iteration i uses core cache slot i mod k (fixed memory); None gives one slot per iteration."""
    warm_start: bool = False
    """Start each token's latent state from the previous token's final state."""
    temperature: float = 0.0
    """0 decodes greedily; otherwise sample from softmax(logits / temperature)."""
    top_k: int | None = None
    top_p: float | None = None
    init_scale: float = 0.0
    """Scale of the random initial state (0: the deterministic zero state)."""
    seed: int = 0
    stop_ids: tuple[int, ...] = ()
    """Token ids that end a row (e.g. the end-of-text token)."""

    def problems(self) -> list[str]:
        out = []
        if self.num_steps < 1:
            out.append(f"--steps: must be >= 1, got {self.num_steps}")
        if self.max_new_tokens < 1:
            out.append(f"--max-new-tokens: must be >= 1, got {self.max_new_tokens}")
        for name, value in (("--temperature", self.temperature), ("--exit-threshold", self.exit_threshold),
                            ("--top-p", self.top_p)):
            if value is not None and not math.isfinite(value):
                out.append(f"{name}: must be a finite number, got {value}")
        if self.exit_threshold is not None and self.exit_threshold < 0:
            out.append(f"--exit-threshold: must be >= 0, got {self.exit_threshold}")
        if self.cache_slots is not None and self.cache_slots < 1:
            out.append(f"--cache-slots: must be >= 1, got {self.cache_slots}")
        if self.temperature < 0:
            out.append(f"--temperature: must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            out.append(f"--top-k: must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            out.append(f"--top-p: must be in (0, 1], got {self.top_p}")
        return out


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # (B, N) generated ids (rows that stopped early keep generating; see lengths)
    lengths: list[int]  # generated tokens per row up to and including its stop token
    depths: torch.Tensor  # (B, N - 1) iterations used for each generated token fed back in (adaptive steps)
    cache_bytes: int
    seconds: float
    prefill_logits: torch.Tensor | None = None  # (B, T0, V) of the prompt, at the full depth
    step_logits: list[torch.Tensor] = field(default_factory=list)  # (B, V) per generated token, if kept

    @property
    def mean_depth(self) -> float:
        """Mean recurrence depth per generated token over the token-by-token steps."""
        return _mean(self.depths)

    def row_mean_depth(self, row: int) -> float:
        """The same for one row, over its steps up to its stop token."""
        return _mean(self.depths[row, :max(self.lengths[row] - 1, 0)])


def _mean(depths: torch.Tensor) -> float:
    return float(depths.float().mean()) if depths.numel() else float("nan")


class KVCache:
    """Keys and values of one block for `num_slots` iterations: (S, B, L, H, D) each, preallocated.
    `key_valid` (B, L), when given, marks the positions that hold a real token (not left padding)."""

    def __init__(self, num_slots: int, batch: int, max_len: int, heads: int, head_dim: int, dtype, device,
                 key_valid: torch.Tensor | None = None):
        self.k = torch.zeros(num_slots, batch, max_len, heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.key_valid = key_valid

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def view(self, slot: int, start: int, write_rows: torch.Tensor | None = None) -> "SlotView":
        return SlotView(self, slot, start, write_rows)

    def fill_from(self, positions: slice | int, depth: torch.Tensor | int):
        """Slots a token did not reach (slot >= its depth) take its deepest entry (slot depth - 1)."""
        num_slots = self.k.shape[0]
        if isinstance(depth, int):
            if depth < num_slots:
                self.k[depth:, :, positions] = self.k[depth - 1, :, positions].unsqueeze(0)
                self.v[depth:, :, positions] = self.v[depth - 1, :, positions].unsqueeze(0)
            return
        for slot in range(1, num_slots):
            rows = (depth <= slot).nonzero().squeeze(1)
            if rows.numel():
                source = depth[rows] - 1
                self.k[slot, rows, positions] = self.k[source, rows, positions]
                self.v[slot, rows, positions] = self.v[source, rows, positions]


class SlotView:
    """What Attention calls with its new keys/values: store them at positions start .. start + T of
    one slot (only in `write_rows` when given) and return everything to attend to."""

    def __init__(self, cache: KVCache, slot: int, start: int, write_rows: torch.Tensor | None):
        self.cache, self.slot, self.start, self.write_rows = cache, slot, start, write_rows

    def __call__(self, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor):
        T = k_BTHD.shape[1]
        end = self.start + T
        keys, values = self.cache.k[self.slot], self.cache.v[self.slot]  # (B, L, H, D)
        if self.write_rows is None:
            keys[:, self.start:end] = k_BTHD
            values[:, self.start:end] = v_BTHD
        else:
            rows = self.write_rows.view(-1, 1, 1, 1)
            keys[:, self.start:end] = torch.where(rows, k_BTHD, keys[:, self.start:end])
            values[:, self.start:end] = torch.where(rows, v_BTHD, values[:, self.start:end])
        mask = None
        if T > 1:  # new token t (at start + t) sees every cached position and the new ones up to itself
            mask = torch.ones(T, end, dtype=torch.bool, device=k_BTHD.device).tril(diagonal=self.start)
        if self.cache.key_valid is not None:  # left-padded rows: no query sees a padding key ...
            valid = self.cache.key_valid[:, None, None, :end]
            mask = valid if mask is None else mask & valid  # (B, 1, T, end)
            if T > 1:  # ... except a padding query its own, so that its softmax has something to weigh
                own = torch.arange(T, device=k_BTHD.device)
                mask = mask.clone()
                mask[:, :, own, self.start + own] = True
        return keys[:, :end].transpose(1, 2), values[:, :end].transpose(1, 2), mask


class DecodeCache:
    """The caches of every block: prelude and coda one slot each, the core `core_slots` each."""

    def __init__(self, model: RecurrentDepthModel, batch: int, max_len: int, core_slots: int,
                 key_valid: torch.Tensor | None = None):
        c = model.config
        p = next(model.parameters())
        make = lambda slots: KVCache(slots, batch, max_len, c.num_heads, c.head_dim, p.dtype, p.device,  # noqa: E731
                                     key_valid)
        self.prelude = [make(1) for _ in model.prelude]
        self.core = [make(core_slots) for _ in model.core]
        self.coda = [make(1) for _ in model.coda]
        self.core_slots = core_slots

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in (*self.prelude, *self.core, *self.coda))

    @property
    def core_nbytes(self) -> int:
        return sum(c.nbytes for c in self.core)


def select_next(logits_BV: torch.Tensor, config: GenerationConfig, generators: list[torch.Generator]) -> torch.Tensor:
    """Greedy (temperature 0) or sampled with temperature, top-k and top-p (nucleus); row b draws
    from generators[b] alone, so a row samples what its prompt alone would."""
    if config.temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits = logits_BV.float() / config.temperature
    if config.top_k is not None and config.top_k < logits.shape[-1]:
        kth = logits.topk(config.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p is not None and config.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= config.top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.cat([torch.multinomial(probs[b:b + 1], 1, generator=g) for b, g in enumerate(generators)]).squeeze(1)


class Generator:
    def __init__(self, model: RecurrentDepthModel, config: GenerationConfig):
        problems = config.problems()
        if problems:
            raise GenerationError("; ".join(problems))
        self.model, self.config = model, config

    @property
    def core_slots(self) -> int:
        return self.config.cache_slots or self.config.num_steps

    def _initial_state(self, embedded: torch.Tensor, new_token: int | None = None) -> torch.Tensor:
        """The initial state of the prompt's tokens (new_token None) or of the n-th new token. Its
        noise (init_scale > 0) is a function of the seed and of the token's place in its own row
        only: a row's prompt, left-padded in a batch, gets the noise it gets alone."""
        if self.config.init_scale == 0:
            return torch.zeros_like(embedded)
        seed = row_noise_seeds(self.config.seed, 0 if new_token is None else 1 + new_token, [0], GENERATION_NOISE)
        state = torch.zeros_like(embedded)
        for b in range(embedded.shape[0]):
            start = self._row_padding[b] if new_token is None else 0
            state[b:b + 1, start:] = self.model.initial_state(embedded[b:b + 1, start:], self.config.init_scale, seed)
        return state

    @torch.no_grad()
    def prefill(self, prompt_BT: torch.Tensor, cache: DecodeCache, rope: torch.Tensor):
        """The prompt at the full depth, filling every cache; (logits (B, T, V), final states (B, T, C))."""
        model, r, slots = self.model, self.config.num_steps, self.core_slots
        T = prompt_BT.shape[1]
        rope = rope[:T]
        embedded = model.embed(prompt_BT, rope, [c.view(0, 0) for c in cache.prelude])
        state = self._initial_state(embedded)
        for i in range(r):
            state = model.core_iteration(state, embedded, rope, [c.view(i % slots, 0) for c in cache.core])
        for c in cache.core:
            c.fill_from(slice(0, T), r)
        return model.readout(state, rope, [c.view(0, 0) for c in cache.coda]), state

    @torch.no_grad()
    def step(self, token_B1: torch.Tensor, position: int, previous_state: torch.Tensor, cache: DecodeCache,
             rope: torch.Tensor):
        """One new token at `position`: (logits (B, V), final state (B, 1, C), depth used (B,))."""
        model, cfg, slots = self.model, self.config, self.core_slots
        B = token_B1.shape[0]
        rope = rope[position:position + 1]
        embedded = model.embed(token_B1, rope, [c.view(0, position) for c in cache.prelude])
        state = previous_state if cfg.warm_start else self._initial_state(embedded, position - self._prompt_width)
        adaptive = cfg.exit_threshold is not None
        active = torch.ones(B, dtype=torch.bool, device=token_B1.device)
        depth = torch.zeros(B, dtype=torch.long, device=token_B1.device)
        previous_logp, logits = None, None
        for i in range(cfg.num_steps):
            views = [c.view(i % slots, position, active if adaptive else None) for c in cache.core]
            new_state = model.core_iteration(state, embedded, rope, views)
            state = torch.where(active.view(B, 1, 1), new_state, state) if adaptive else new_state
            depth += active
            if adaptive:
                logits = model.readout(state, rope, [c.view(0, position) for c in cache.coda])[:, -1]
                logp = F.log_softmax(logits.float(), dim=-1)
                if previous_logp is not None:
                    # KL(p_i || p_{i-1}); rounding can make it a hair below 0, which must not pass threshold 0
                    kl = (logp.exp() * (logp - previous_logp)).sum(-1).clamp_min(0)
                    active = active & ~(kl < cfg.exit_threshold)
                previous_logp = logp
                if not active.any():
                    break
        if not adaptive:
            logits = model.readout(state, rope, [c.view(0, position) for c in cache.coda])[:, -1]
        for c in cache.core:
            c.fill_from(position, depth)
        return logits, state, depth

    @torch.no_grad()
    def generate(self, prompt_BT: torch.Tensor | list[list[int]], keep_logits: bool = False) -> GenerationResult:
        """Continue every row of prompt_BT, or every prompt of a list of token lists of any lengths
        (left-padded into one batch)."""
        model, cfg = self.model, self.config
        key_valid, padding = None, None
        if isinstance(prompt_BT, list):
            if not prompt_BT or min(len(p) for p in prompt_BT) < 1:
                raise GenerationError("every prompt must hold at least one token")
            width = max(len(p) for p in prompt_BT)
            padding = torch.tensor([width - len(p) for p in prompt_BT])
            prompt_BT = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompt_BT], dtype=torch.long)
            if padding.any():
                total = width + cfg.max_new_tokens
                key_valid = torch.arange(total)[None, :] >= padding[:, None]
        if prompt_BT.ndim != 2 or prompt_BT.shape[1] < 1:
            raise GenerationError("the prompt must hold at least one token")
        B, T0 = prompt_BT.shape
        total = T0 + cfg.max_new_tokens
        if total > model.config.max_seq_len:
            raise GenerationError(f"prompt ({T0} tokens) + --max-new-tokens ({cfg.max_new_tokens}) exceeds the "
                                  f"model's max_seq_len = {model.config.max_seq_len}")
        device = next(model.parameters()).device
        prompt_BT = prompt_BT.to(device)
        # one stream per row, each seeded alike: a row samples what its prompt alone samples
        generators = [torch.Generator(device=device).manual_seed(cfg.seed) for _ in range(B)]
        self._row_padding = padding.tolist() if padding is not None else [0] * B
        self._prompt_width = T0
        started = time.perf_counter()
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):  # nothing drawn globally
            if key_valid is not None:
                key_valid = key_valid.to(device)
            cache = DecodeCache(model, B, max(total, 1), self.core_slots, key_valid)
            rope = model.rope(total, device)
            prefill_logits, states = self.prefill(prompt_BT, cache, rope)
            logits, state = prefill_logits[:, -1], states[:, -1:]
            tokens, depths, step_logits = [], [], []
            finished = torch.zeros(B, dtype=torch.bool, device=device)
            lengths = [cfg.max_new_tokens] * B
            stop = torch.tensor(list(cfg.stop_ids), dtype=torch.long, device=device)
            for n in range(cfg.max_new_tokens):
                if keep_logits:
                    step_logits.append(logits)
                token = select_next(logits, cfg, generators)
                tokens.append(token)
                if stop.numel():
                    newly = torch.isin(token, stop) & ~finished
                    for row in newly.nonzero().squeeze(1).tolist():
                        lengths[row] = n + 1
                    finished |= newly
                    if finished.all():
                        break
                if n == cfg.max_new_tokens - 1:
                    break
                logits, state, depth = self.step(token[:, None], T0 + n, state, cache, rope)
                depths.append(depth)
        empty = torch.empty(B, 0, dtype=torch.long, device=device)
        return GenerationResult(
            tokens=torch.stack(tokens, dim=1) if tokens else empty,
            lengths=lengths if cfg.stop_ids else [len(tokens)] * B,
            depths=torch.stack(depths, dim=1) if depths else empty,
            cache_bytes=cache.nbytes, seconds=time.perf_counter() - started,
            prefill_logits=prefill_logits, step_logits=step_logits)


def generate_text(checkpoint: str, prompts: list[str], config: GenerationConfig, tokenizer: str | None = None,
                  add_bos: bool = True, device: str = "cpu", batch_size: int = 8, log=print) -> list[dict]:
    """`rdhpc generate`: the prompts in batches of up to batch_size (any lengths), each printed with
    its statistics."""
    if batch_size < 1:
        raise GenerationError(f"--batch-size: must be >= 1, got {batch_size}")
    from rdhpc.data.tokenizer import TextTokenizer
    from rdhpc.export import load_checkpoint

    loaded = load_checkpoint(checkpoint, device=device)
    if not tokenizer:
        tokenizer, missing = loaded.tokenizer_or_none_with_reason()
        if tokenizer is None:
            raise GenerationError(f"{missing}; pass --tokenizer PATH")
    tok = TextTokenizer(tokenizer)
    if tok.vocab_size > loaded.model.config.padded_vocab_size:
        raise GenerationError(f"{tokenizer}: {tok.vocab_size} tokens, the model embeds "
                              f"{loaded.model.config.padded_vocab_size}")
    if not config.stop_ids:
        config.stop_ids = (tok.eos_id,)
    generator = Generator(loaded.model, config)
    results = []
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first:first + batch_size]
        ids = [([tok.bos_id] if add_bos else []) + tok.encode(prompt).tolist() for prompt in batch]
        out = generator.generate(ids)
        for row, prompt in enumerate(batch):
            new = out.tokens[row, :out.lengths[row]].tolist()
            text = tok.decode([t for t in new if t not in config.stop_ids])
            mean_depth = out.row_mean_depth(row)
            results.append({"prompt": prompt, "completion": text, "tokens": len(new), "mean_depth": mean_depth,
                            "cache_mib": out.cache_bytes / 2 ** 20, "seconds": out.seconds, "batch": len(batch)})
            log(prompt + text)
            log(f"[generate] {len(new)} tokens in {out.seconds:.2f} s (batch of {len(batch)}); mean depth per token "
                f"{mean_depth:.2f} of {config.num_steps}; KV cache {out.cache_bytes / 2 ** 20:.2f} MiB "
                f"({generator.core_slots} core slot(s))")
    return results
