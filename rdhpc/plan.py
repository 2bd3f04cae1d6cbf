"""What a run will cost before it is submitted: parameters, FLOPs per token, memory per GPU for each
ZeRO stage, step time and days to a token budget.

    rdhpc plan configs/huginn-3.5b-frontier.yaml --gpus 4096 --gpu-type mi250x --tokens 800e9
    rdhpc plan configs/debug.yaml --set model.size=rd-1b --gpus 64 --gpu-type h100 --tokens 200B --mfu 0.4 --json

FLOPs follow rdhpc.train.metrics.flops_per_token (forward of every iteration, backward of the last k,
attention scores over the full sequence). "At the mean depth" counts r = mean_recurrence, as the
paper's logged MFU did; "sampled" is the expectation over the training depth distribution (the
log-normal Poisson sampler: E[r] = mean + 1), which is what the hardware actually does. Times use the
sampled figure.

Memory per GPU, Psi = parameters, N = data-parallel ranks (ZeRO shards over all of them):

| stage | weights          | gradients          | optimizer state  | gathered weights (ZeRO 3)          |
|-------|------------------|--------------------|------------------|------------------------------------|
| 0     | w Psi            | 4 Psi              | o Psi            |                                    |
| 1     | w Psi            | 4 Psi              | o Psi / N        |                                    |
| 2     | w Psi            | 4 Psi / N          | o Psi / N        |                                    |
| 3     | w Psi / N        | 4 Psi / N          | o Psi / N        | w min(Psi, live + prefetch)        |

bf16: w = 2, gradients reduced and accumulated in float32 (4 bytes, this project's DeepSpeed config),
o = 12 (float32 master weights, Adam m and v); fp32 and bf16-autocast (float32 weights under bf16
autocast, the paper's precision): w = 4, o = 8 (the float32 weights are the master copy). ZeRO 3
gathers each layer's weights when it runs and keeps up to stage3_max_live_parameters (DeepSpeed's
default 1e9) plus the prefetch bucket (5e7) of them gathered.

Activations are MEASURED, not estimated: `saved_activations` runs the training forward of the
configured model on the meta device (no memory, no compute: seconds at the 3.5B shape) and adds up
every tensor autograd keeps for backward, by storage, as the GPU would keep it (attention as
FlashAttention keeps it: q, k, v, output and the log-sum-exp, no (T, T) scores; under
bf16-autocast, the matrix products' bf16 operands and autocast's bf16 copy of every weight).
`tools/activation_memory.py` prints the same measurement by tensor; a test checks it against a real
CPU forward. Three ways to run the k back-propagated core iterations are measured:
    none              everything kept
    core_mlp          model.checkpoint_core_mlp: each core block's MLP recomputed in backward
                      (+ one MLP's activations while it is recomputed)
    whole_iteration   model.activation_checkpointing: only each core iteration's input kept
                      (+ one iteration's activations while it is recomputed)
Not counted: the framework's own few GiB, the allocator's fragmentation, DeepSpeed's communication
buckets and backward's transient buffers; a setting "fits" when it leaves HEADROOM of the device
free for them. The plan names the cheapest setting that fits: the least recompute (which costs
FLOPs on every step and never overlaps), then not ZeRO 3 (it adds an all-gather of the weights in
forward and backward, 1.5x the traffic of stages 0-2, which can overlap), then the least memory
(stages 0, 1 and 2 move the same bytes: an all-reduce, or its reduce-scatter and all-gather).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from rdhpc.errors import UserError
from rdhpc.model.config import ModelConfig
from rdhpc.train.metrics import flops_per_token


@dataclass(frozen=True)
class GpuType:
    name: str
    peak_tflops: float  # dense bf16, per device (an MI250X die is one device)
    memory_gib: float
    default_mfu: float  # what the plan assumes unless --mfu is given
    mfu_basis: str


GPU_TYPES = {
    "mi250x": GpuType("AMD MI250X (one die / GCD)", 191.5, 64.0, 0.30,
                      "the paper's 3.5B run: 52-64 TFLOP/s per die at 4096 dies = 27-33% of 191.5"),
    "h100": GpuType("NVIDIA H100 SXM", 989.4, 80.0, 0.40, "typical dense-transformer MFU at scale"),
    "h200": GpuType("NVIDIA H200 SXM", 989.4, 141.0, 0.40, "typical dense-transformer MFU at scale"),
    "a100": GpuType("NVIDIA A100 SXM 80GB", 312.0, 80.0, 0.45, "typical dense-transformer MFU at scale"),
}
GIB = 2 ** 30


class PlanError(UserError, ValueError):
    pass


def depth_moments(config: ModelConfig, samples: int = 1_000_000, seed: int = 0) -> dict[str, float]:
    """E[r], E[min(r, k)] and percentiles of the training depth distribution (Monte Carlo, seeded)."""
    k = config.mean_backprop_depth
    if config.sampling_scheme == "fixed":
        r = np.full(1, config.mean_recurrence)
    else:
        rng = np.random.default_rng(seed)
        sigma = config.recurrence_sigma
        tau = rng.normal(math.log(config.mean_recurrence) - 0.5 * sigma ** 2, sigma, size=samples)
        r = rng.poisson(np.exp(tau)) + 1
    return {"mean": float(r.mean()), "mean_with_grad": float(np.minimum(r, k).mean()),
            "median": float(np.median(r)), "p5": float(np.percentile(r, 5)), "p95": float(np.percentile(r, 95)),
            "p99": float(np.percentile(r, 99))}


RECOMPUTE_MODES = {  # the name in the plan -> the model config that runs it
    "none": {"activation_checkpointing": False, "checkpoint_core_mlp": False},
    "core_mlp": {"activation_checkpointing": False, "checkpoint_core_mlp": True},
    "whole_iteration": {"activation_checkpointing": True, "checkpoint_core_mlp": False},
}
RECOMPUTE_LABELS = {"none": "no recompute", "core_mlp": "core MLPs recomputed",
                    "whole_iteration": "whole core iterations recomputed"}
RECOMPUTE_SHORT = {"none": "(none)", "core_mlp": "(core mlp)", "whole_iteration": "(whole iter)"}
HEADROOM = 0.10  # of the device's memory, left for what the plan does not count
ZERO3_LIVE_PARAMETERS = 1_000_000_000 + 50_000_000  # DeepSpeed's stage3_max_live_parameters + prefetch bucket


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


def _autocast_on_meta():
    """torch.autocast(bf16) as a TorchFunctionMode, for the meta device, which autocast ignores:
    the matrix products take bf16 copies of float32 operands (each weight cast once and cached where
    gradients are on, as autocast caches a leaf's cast), the softmax-like ops float32; everything
    else runs as it comes. A test holds it to torch.autocast on the CPU."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    lower = {F.linear, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.Tensor.matmul,
             torch.Tensor.__matmul__, F.scaled_dot_product_attention}
    higher = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, torch.Tensor.softmax,
              torch.Tensor.log_softmax, F.cross_entropy, F.nll_loss, torch.logsumexp, torch.Tensor.logsumexp}

    class MetaAutocast(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.cache = {}

        def cast(self, value, dtype):
            if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype):
                return value
            # autocast caches only with gradients on (a cast made under no_grad would cut the graph)
            if dtype == torch.bfloat16 and value.is_leaf and value.requires_grad and torch.is_grad_enabled():
                key = id(value)
                if key not in self.cache:
                    self.cache[key] = (value, value.to(dtype))  # the weight itself kept: its id stays its own
                return self.cache[key][1]
            return value.to(dtype)

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            dtype = torch.bfloat16 if func in lower else torch.float32 if func in higher else None
            if dtype is not None:
                args = tuple(self.cast(a, dtype) for a in args)
                kwargs = {k: self.cast(v, dtype) for k, v in kwargs.items()}
            return func(*args, **kwargs)

    return MetaAutocast()


def saved_activations(model_config: ModelConfig, seq_len: int, micro_batch: int, depth, precision: str) -> dict:
    """{(shape, dtype name): bytes} of the tensors one training forward at `depth` = (iterations
    without gradient, with gradient) saves for backward, on the meta device, with the weights of
    `precision` (bf16, fp32, or float32 weights under emulated bf16 autocast)."""
    from collections import defaultdict

    import torch

    import rdhpc.model.layers as layers
    from rdhpc.model.recurrent_depth import RecurrentDepthModel

    with torch.device("meta"):
        model = RecurrentDepthModel(model_config).to(torch.bfloat16 if precision == "bf16" else torch.float32)
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
    autocast = _autocast_on_meta() if precision == "bf16-autocast" else contextlib.nullcontext()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            model(ids, num_steps=tuple(depth), labels=ids, return_logits=False)
    finally:
        layers.F.scaled_dot_product_attention = real_sdpa
    return dict(by_kind)


def activation_memory(c: ModelConfig, micro_batch: int, seq_len: int, precision: str) -> dict[str, int]:
    """Peak bytes of activations per GPU for each RECOMPUTE_MODES entry: what the forward keeps
    (measured with saved_activations at k back-propagated iterations) plus, with recompute, what
    one recomputed piece keeps while backward goes through it."""
    k = c.mean_backprop_depth
    n = 1 if c.mean_recurrence > k else 0  # iterations without gradient keep nothing (at most one copy out)

    def measure(depth, mode):
        config = dataclasses.replace(c, max_seq_len=max(c.max_seq_len, seq_len), **RECOMPUTE_MODES[mode])
        return sum(saved_activations(config, seq_len, micro_batch, depth, precision).values())

    plain = measure((n, k), "none")
    one_iteration = plain - measure((n + 1, k - 1), "none")
    mlp_kept = measure((n, k), "core_mlp")
    one_mlp = (plain - mlp_kept) // (k * c.num_core_layers)
    if precision == "bf16-autocast":
        # what backward recasts while it recomputes: the first forward's bf16 weight copies are
        # counted once in `plain`, but a recomputed piece casts its weights again
        h, inner = c.hidden_size, c.intermediate_size
        block = 4 * h * h + 3 * h * inner
        one_mlp += 2 * 3 * h * inner
        one_iteration += 2 * (c.num_core_layers * block + (2 * h * h if c.injection_type == "linear" else 0))
    return {"none": plain, "core_mlp": mlp_kept + one_mlp,
            "whole_iteration": measure((n, k), "whole_iteration") + one_iteration}


def recompute_flops_per_token(c: ModelConfig, seq_len: int, mean_with_grad: float) -> dict[str, float]:
    """FLOPs each recompute mode adds per token: the MLPs of the core blocks, or whole core
    iterations, run forward again for the E[min(r, k)] iterations with gradient."""
    mlp = 2 * 3 * c.hidden_size * c.intermediate_size
    iteration = flops_per_token(c, seq_len, 1, 0) - flops_per_token(c, seq_len, 0, 0)
    return {"none": 0.0, "core_mlp": mean_with_grad * c.num_core_layers * mlp,
            "whole_iteration": mean_with_grad * iteration}


def checkpoint_bytes(model: ModelConfig, precision: str) -> int:
    """Bytes of one checkpoint over all ranks: the model's weights as the engine holds them plus the
    optimizer state (float32 master weights where the weights are bf16, Adam's m and v), which every
    ZeRO stage writes in full, sharded or not."""
    import torch

    from rdhpc.model.recurrent_depth import RecurrentDepthModel

    with torch.device("meta"):
        params = RecurrentDepthModel(model).parameter_counts()["total"]
    states = state_bytes(params, 0, 1, precision)
    return int(states["weights"] + states["optimizer"])


def state_bytes(num_params: int, stage: int, num_ranks: int, precision: str) -> dict[str, float]:
    w, o = (2, 12) if precision == "bf16" else (4, 8)  # fp32 and bf16-autocast: float32 weights
    weights = w * num_params / (num_ranks if stage >= 3 else 1)
    gradients = 4 * num_params / (num_ranks if stage >= 2 else 1)
    optimizer = o * num_params / (num_ranks if stage >= 1 else 1)
    gathered = w * min(num_params, ZERO3_LIVE_PARAMETERS) if stage == 3 and num_ranks > 1 else 0
    return {"weights": weights, "gradients": gradients, "optimizer": optimizer, "gathered": gathered}


@dataclass
class Plan:
    model: str
    gpus: int
    gpu: dict
    tokens: float
    mfu: float
    mfu_basis: str
    seq_len: int
    global_batch: int
    micro_batch: int
    precision: str
    parameters: dict
    depth: dict
    flops_per_token: dict
    activations_gib: dict  # recompute mode -> GiB per GPU
    memory_gib: dict  # stage -> weights, gradients, optimizer, gathered, total and fits by recompute mode
    budget_gib: float  # what a setting may use: the device's memory less HEADROOM
    recompute_cost: dict  # recompute mode -> extra FLOPs as a fraction of the step's
    recommended: dict | None  # the cheapest setting that fits, None when none does
    configured: dict | None  # the run's own setting
    time: dict
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def report(self) -> str:
        p, f, t, d = self.parameters, self.flops_per_token, self.time, self.depth
        lines = [
            f"# plan: {self.model} on {self.gpus} x {self.gpu['name']} ({self.gpu['peak_tflops']} TFLOP/s bf16 peak, "
            f"{self.gpu['memory_gib']:.0f} GiB), {self.tokens:.4g} tokens",
            "",
            "parameters",
            f"  total            {p['total']:>18,}",
            f"  recurrent        {p['recurrent']:>18,}   (core {p['core']:,} + adapter {p['adapter']:,}; run r times)",
            f"  non-recurrent    {p['non_recurrent']:>18,}   (embedding/head, prelude, coda, final norm)",
        ]
        for r, n in p["unrolled"].items():
            lines.append(f"  unrolled at r={r:<4}{n:>17,}")
        lines += [
            "",
            f"depth (training distribution): mean r {d['mean']:.2f} (configured {d['configured_mean']}), median "
            f"{d['median']:.0f}, 5th/95th/99th percentiles {d['p5']:.0f}/{d['p95']:.0f}/{d['p99']:.0f}; "
            f"backprop depth k = {d['k']} (E[min(r, k)] = {d['mean_with_grad']:.2f})",
            "",
            "training FLOPs per token (forward + backward)",
            f"  at the mean depth r = {d['configured_mean']:<4}  {f['mean_depth'] / 1e9:10.2f} GFLOP",
            f"  sampled distribution      {f['sampled'] / 1e9:10.2f} GFLOP",
            f"  6 x stored parameters     {f['six_n'] / 1e9:10.2f} GFLOP   (what a plain transformer count would say)",
            "",
            f"memory per GPU in GiB ({self.precision}, micro-batch {self.micro_batch} x {self.seq_len} tokens, "
            f"ZeRO over {self.gpus} ranks; fits: at most {self.budget_gib:.1f} of {self.gpu['memory_gib']:.0f} GiB, "
            f"{HEADROOM:.0%} left for what is not counted)",
            "  activations (measured on the meta device): " + ", ".join(
                f"{a:.2f} {RECOMPUTE_LABELS[mode]} (+{self.recompute_cost[mode]:.0%} compute)"
                for mode, a in self.activations_gib.items()),
            f"  {'stage':<6}{'weights':>9}{'grads':>9}{'optim':>9}{'gathered':>10}   "
            + "".join(f"{'total ' + RECOMPUTE_SHORT[mode]:>20}" for mode in RECOMPUTE_MODES),
        ]
        for stage, m in self.memory_gib.items():
            totals = "".join(f"{m['total'][mode]:>15.2f} {'fits' if m['fits'][mode] else '  - '}"
                             for mode in RECOMPUTE_MODES)
            lines.append(f"  {stage:<6}{m['weights']:>9.2f}{m['gradients']:>9.2f}{m['optimizer']:>9.2f}"
                         f"{m['gathered']:>10.2f}   {totals}")
        if self.recommended:
            r = self.recommended
            lines.append(f"  cheapest setting that fits: ZeRO {r['zero_stage']}, {RECOMPUTE_LABELS[r['recompute']]}: "
                         f"{r['total_gib']:.2f} GiB, +{r['extra_compute']:.0%} compute  (--set "
                         + " --set ".join(r["overrides"]) + ")")
        else:
            lines.append("  no setting fits: a smaller micro-batch, more GPUs for ZeRO 3, or "
                         "zero.offload_optimizer")
        if self.configured:
            c = self.configured
            lines.append(f"  configured: ZeRO {c['zero_stage']}, {RECOMPUTE_LABELS[c['recompute']]}: "
                         f"{c['total_gib']:.2f} GiB, " + ("fits" if c["fits"] else "DOES NOT FIT")
                         + f", +{c['extra_compute']:.0%} compute")
        lines += [
            "",
            f"time at MFU {self.mfu:.0%} ({self.mfu_basis})",
            f"  global batch {self.global_batch} x {self.seq_len} = {t['tokens_per_step']:,} tokens per step",
            f"  step time {t['step_seconds']:.2f} s;  {t['tokens_per_second'] / 1e6:.3f} M tokens/s;  "
            f"{t['tflops_per_gpu']:.1f} TFLOP/s per GPU (sampled depth), "
            f"{t['tflops_per_gpu_mean_depth_count']:.1f} counted at the mean depth",
            f"  {t['steps']:,.0f} steps, {t['days']:.2f} days ({t['gpu_hours']:,.0f} GPU-hours)",
        ]
        if self.notes:
            lines += [""] + [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def make_plan(model: ModelConfig, gpus: int, gpu_type: str, tokens: float, mfu: float | None = None,
              global_batch: int = 4096, micro_batch: int = 1, precision: str = "bf16",
              unrolled_depths=(1, 4, 8, 16, 32, 64), zero_stage: int | None = None) -> Plan:
    """`zero_stage`: the run's (with the model's recompute setting: the configured memory)."""
    import torch

    from rdhpc.model.recurrent_depth import RecurrentDepthModel

    problems = []
    if gpus < 1:
        problems.append(f"--gpus: must be >= 1, got {gpus}")
    if gpu_type not in GPU_TYPES:
        problems.append(f"--gpu-type: unknown {gpu_type!r}; choose one of {sorted(GPU_TYPES)}")
    if tokens <= 0:
        problems.append(f"--tokens: must be > 0, got {tokens}")
    if mfu is not None and not 0 < mfu <= 1:
        problems.append(f"--mfu: must be in (0, 1], got {mfu}")
    if micro_batch < 1:
        problems.append(f"--micro-batch: must be >= 1, got {micro_batch}")
    if problems:
        raise PlanError("; ".join(problems))
    gpu = GPU_TYPES[gpu_type]
    mfu_basis = "given" if mfu is not None else f"default for {gpu_type}: {gpu.mfu_basis}"
    mfu = mfu if mfu is not None else gpu.default_mfu

    with torch.device("meta"):
        net = RecurrentDepthModel(model)
    counts = net.parameter_counts()
    recurrent = counts["core"] + counts["adapter"]
    depth = depth_moments(model)
    r_mean, k, T = model.mean_recurrence, model.mean_backprop_depth, model.max_seq_len
    parameters = {"total": counts["total"], "core": counts["core"], "adapter": counts["adapter"],
                  "recurrent": recurrent, "non_recurrent": counts["total"] - recurrent,
                  "unrolled": {r: net.unrolled_parameters(r) for r in sorted({*unrolled_depths, r_mean})}}

    # flops_per_token is linear in (n_no_grad + n_grad) and n_grad: its expectation is exact from E[r], E[min(r,k)].
    base = flops_per_token(model, T, 0, 0)
    per_iteration = flops_per_token(model, T, 1, 0) - base
    per_grad_iteration = flops_per_token(model, T, 0, 1) - base - per_iteration
    mean_flops = flops_per_token(model, T, max(r_mean - k, 0), min(r_mean, k))
    sampled = base + depth["mean"] * per_iteration + depth["mean_with_grad"] * per_grad_iteration
    flops = {"mean_depth": mean_flops, "sampled": sampled, "six_n": 6.0 * counts["total"],
             "forward_per_iteration": per_iteration}

    activations = {mode: b / GIB for mode, b in activation_memory(model, micro_batch, T, precision).items()}
    budget = gpu.memory_gib * (1 - HEADROOM)
    memory = {}
    for stage in range(4):
        states = {key: v / GIB for key, v in state_bytes(counts["total"], stage, gpus, precision).items()}
        totals = {mode: sum(states.values()) + act for mode, act in activations.items()}
        memory[stage] = {**states, "total": totals, "fits": {mode: t <= budget for mode, t in totals.items()}}
    extra = recompute_flops_per_token(model, T, depth["mean_with_grad"])
    recompute_cost = {mode: f / sampled for mode, f in extra.items()}
    # bf16 at stage 0 is refused at load (DeepSpeed's stage-0 bf16 wrapper), so never proposed
    stages = [st for st in range(4) if not (precision == "bf16" and st == 0)]
    fitting = [(recompute_cost[mode], st == 3, memory[st]["total"][mode], st, mode) for mode in RECOMPUTE_MODES
               for st in stages if memory[st]["fits"][mode]]
    recommended = None
    if fitting:
        *_, st, mode = min(fitting)
        recommended = {"zero_stage": st, "recompute": mode, "total_gib": memory[st]["total"][mode],
                       "extra_compute": recompute_cost[mode],
                       "overrides": [f"zero.stage={st}"] + [f"model.{key}={'true' if on else 'false'}"
                                                            for key, on in RECOMPUTE_MODES[mode].items()]}
    configured_mode = ("whole_iteration" if model.activation_checkpointing else
                       "core_mlp" if model.checkpoint_core_mlp else "none")
    configured = None
    if zero_stage is not None:
        configured = {"zero_stage": zero_stage, "recompute": configured_mode,
                      "total_gib": memory[zero_stage]["total"][configured_mode],
                      "fits": memory[zero_stage]["fits"][configured_mode],
                      "extra_compute": recompute_cost[configured_mode]}

    tokens_per_step = global_batch * T
    achieved = gpus * gpu.peak_tflops * 1e12 * mfu  # model FLOP/s of the whole run
    step_seconds = tokens_per_step * sampled / achieved
    tokens_per_second = tokens_per_step / step_seconds
    steps = tokens / tokens_per_step
    seconds = steps * step_seconds
    time = {"tokens_per_step": tokens_per_step, "step_seconds": step_seconds, "tokens_per_second": tokens_per_second,
            "tflops_per_gpu": gpu.peak_tflops * mfu,
            "tflops_per_gpu_mean_depth_count": tokens_per_second * mean_flops / gpus / 1e12,
            "steps": steps, "days": seconds / 86400, "gpu_hours": seconds * gpus / 3600}
    notes = []
    if global_batch % (micro_batch * gpus):
        notes.append(f"global batch {global_batch} is not a multiple of micro-batch x GPUs = {micro_batch * gpus}")
    elif global_batch // (micro_batch * gpus) > 1:
        notes.append(f"{global_batch // (micro_batch * gpus)} gradient-accumulation micro-steps per step")
    return Plan(model=model.size or "(custom)", gpus=gpus, gpu=asdict(gpu), tokens=float(tokens), mfu=mfu,
                mfu_basis=mfu_basis, seq_len=T, global_batch=global_batch, micro_batch=micro_batch,
                precision=precision, parameters=parameters,
                depth={**depth, "configured_mean": r_mean, "k": k}, flops_per_token=flops,
                activations_gib=activations, memory_gib=memory, budget_gib=budget, recompute_cost=recompute_cost,
                recommended=recommended, configured=configured, time=time, notes=notes)


def plan_from_config(path: str, overrides=(), gpus: int = 1, gpu_type: str = "h100", tokens: float = 1e9,
                     mfu: float | None = None, micro_batch: int | None = None) -> Plan:
    from rdhpc.config import load_config

    run = load_config(path, list(overrides))
    return make_plan(run.model, gpus, gpu_type, tokens, mfu, global_batch=run.train.global_batch_size,
                     micro_batch=run.train.micro_batch_size if micro_batch is None else micro_batch,
                     precision=run.train.precision, zero_stage=run.zero.stage)
