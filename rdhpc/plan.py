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

| stage | weights          | gradients          | optimizer state                          |
|-------|------------------|--------------------|------------------------------------------|
| 0     | w Psi            | 4 Psi              | o Psi                                    |
| 1     | w Psi            | 4 Psi              | o Psi / N                                |
| 2     | w Psi            | 4 Psi / N          | o Psi / N                                |
| 3     | w Psi / N        | 4 Psi / N          | o Psi / N                                |

bf16: w = 2, gradients reduced and accumulated in float32 (4 bytes, this project's DeepSpeed config),
o = 12 (float32 master weights, Adam m and v); fp32 and bf16-autocast (float32 weights under bf16
autocast, the paper's precision): w = 4, o = 8 (the float32 weights are the master copy).
Activations below are counted at bf16-mode widths; under bf16-autocast the residual stream and
the norms' outputs are float32, which adds to them. Not counted: DeepSpeed's
communication buckets, ZeRO-3 prefetch buffers, the allocator's fragmentation, the framework's own
few GB (allow ~10-15% headroom).

Activations, saved for the backward pass, bytes per token (h hidden, I MLP width, V vocabulary):
    one sandwich block    36 h + 8 I   (4 RMSNorm inputs in float32 16h, qkv input 2h, q/k rotated in
                                        float32 8h, q/k/v + attention output for SDPA 8h, MLP input 2h,
                                        gate/up 4I, silu(gate) 2I, product 2I; flash-style attention:
                                        no T x T term)
    adapter (per grad iteration) 4 h;  logits and log-softmax in float32 for the loss  8 V
Without checkpointing the graph holds P + C + k R blocks (k = mean_backprop_depth). With it
(model.activation_checkpointing: each core iteration recomputed) it holds P + C blocks, the k
iteration inputs (2 h each) and one iteration recomputed at a time (R blocks).
"""

from __future__ import annotations

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


def block_activation_bytes(c: ModelConfig) -> int:
    """Bytes saved for the backward pass per token by one sandwich block (see the module docstring)."""
    return 36 * c.hidden_size + 8 * c.intermediate_size


def activation_bytes(c: ModelConfig, micro_batch: int, seq_len: int, checkpointing: bool) -> int:
    h, V = c.hidden_size, c.padded_vocab_size
    k, R = c.mean_backprop_depth, c.num_core_layers
    outer = c.num_prelude_layers + c.num_coda_layers
    block = block_activation_bytes(c)
    if checkpointing:
        per_token = outer * block + k * 2 * h + R * block + 4 * h + 8 * V
    else:
        per_token = (outer + k * R) * block + k * 4 * h + 8 * V
    return micro_batch * seq_len * per_token


def state_bytes(num_params: int, stage: int, num_ranks: int, precision: str) -> dict[str, float]:
    w, o = (2, 12) if precision == "bf16" else (4, 8)  # fp32 and bf16-autocast: float32 weights
    weights = w * num_params / (num_ranks if stage >= 3 else 1)
    gradients = 4 * num_params / (num_ranks if stage >= 2 else 1)
    optimizer = o * num_params / (num_ranks if stage >= 1 else 1)
    return {"weights": weights, "gradients": gradients, "optimizer": optimizer}


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
    memory_gib: dict
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
            f"ZeRO over {self.gpus} ranks)",
            f"  {'stage':<6}{'weights':>9}{'grads':>9}{'optim':>9}{'act':>9}{'act ckpt':>10}{'total':>9}"
            f"{'total ckpt':>12}  fits",
        ]
        for stage, m in self.memory_gib.items():
            fits = ("yes" if m["fits"] else ("with ckpt" if m["fits_with_checkpointing"] else "no"))
            lines.append(f"  {stage:<6}{m['weights']:>9.2f}{m['gradients']:>9.2f}{m['optimizer']:>9.2f}"
                         f"{m['activations']:>9.2f}{m['activations_checkpointed']:>10.2f}{m['total']:>9.2f}"
                         f"{m['total_checkpointed']:>12.2f}  {fits}")
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
              unrolled_depths=(1, 4, 8, 16, 32, 64)) -> Plan:
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

    memory = {}
    for stage in range(4):
        states = state_bytes(counts["total"], stage, gpus, precision)
        act = activation_bytes(model, micro_batch, T, checkpointing=False)
        act_ckpt = activation_bytes(model, micro_batch, T, checkpointing=True)
        total = sum(states.values()) + act
        total_ckpt = sum(states.values()) + act_ckpt
        memory[stage] = {**{key: v / GIB for key, v in states.items()}, "activations": act / GIB,
                         "activations_checkpointed": act_ckpt / GIB, "total": total / GIB,
                         "total_checkpointed": total_ckpt / GIB, "fits": total / GIB <= gpu.memory_gib,
                         "fits_with_checkpointing": total_ckpt / GIB <= gpu.memory_gib}

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
                depth={**depth, "configured_mean": r_mean, "k": k}, flops_per_token=flops, memory_gib=memory,
                time=time, notes=notes)


def plan_from_config(path: str, overrides=(), gpus: int = 1, gpu_type: str = "h100", tokens: float = 1e9,
                     mfu: float | None = None, micro_batch: int | None = None) -> Plan:
    from rdhpc.config import load_config

    run = load_config(path, list(overrides))
    return make_plan(run.model, gpus, gpu_type, tokens, mfu, global_batch=run.train.global_batch_size,
                     micro_batch=run.train.micro_batch_size if micro_batch is None else micro_batch,
                     precision=run.train.precision)
