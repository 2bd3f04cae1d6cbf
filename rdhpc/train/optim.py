"""Optimizers and learning-rate schedules of the trainer, as plain torch objects DeepSpeed accepts.

- "adamw": torch.optim.AdamW (nothing to compile: DeepSpeed's FusedAdam and CPUAdam build ops first).
- "adam-atan2": the paper's Adam variant (AdamAtan2 below).
Both decay every weight except norms and qk_bias (the paper's choice: the embedding and the tied
head are decayed), with decoupled decay of the form `optim.weight_decay_scaling` names.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from rdhpc.config.schema import OptimConfig, ScheduleConfig


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed matrices (and the embedding), undecayed norms and qk_bias."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith("qk_bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


@dataclass
class FlatLayout:
    """Where the model's tensors lie inside one flat parameter that ZeRO hands the optimizer (a
    rank's partition of a whole parameter group, flattened): consecutive runs (tensor index or
    -1 for alignment padding, length), the element count of every tensor of the group, and the
    process group whose ranks hold the other parts of the same tensors."""

    runs: list[tuple[int, int]]
    tensor_numels: list[int]
    process_group: object = None

    def __post_init__(self):
        # derived once, not at every step: (tensor index, start, length) of the runs that hold a tensor
        starts = itertools.accumulate([0] + [length for _, length in self.runs[:-1]])
        self.owners = [(owner, start, length) for (owner, length), start in zip(self.runs, starts) if owner >= 0]
        self.owner_index = torch.tensor([k for k, _, _ in self.owners], dtype=torch.long)
        self.numels = torch.tensor(self.tensor_numels, dtype=torch.float64)


def flat_layout(numels: list[int], paddings: list[int], partition_size: int, partition_id: int) -> list[tuple[int, int]]:
    """The runs of partition `partition_id` (of `partition_size` elements) of a flat buffer that
    holds tensor k (numels[k] elements) followed by paddings[k] zeros, for k in order, then zeros."""
    start, end = partition_size * partition_id, partition_size * (partition_id + 1)
    runs, position = [], 0
    for k, (numel, padding) in enumerate(zip(numels, paddings)):
        for owner, length in ((k, numel), (-1, padding)):
            overlap = min(end, position + length) - max(start, position)
            if overlap > 0:
                runs.append((owner, overlap))
            position += length
    covered = sum(length for _, length in runs)
    if covered < partition_size:
        runs.append((-1, partition_size - covered))
    return runs


class AdamAtan2(torch.optim.Optimizer):
    """The Adam variant of the 3.5B run, as the released code computes it (its ELLISAdam with
    atan_adam, running_init, update_clipping and decouple_wd; the run's optim_config). Per tensor,
    at step t (1-based), with g its gradient:

        m = g, v = g^2 at t = 1 (running init), else m <- b1 m + (1 - b1) g, v <- b2 v + (1 - b2) g^2
        v <- max(v, eps^2)                     in place (eps = atan2_eps: 1e-6 in the released run; 0: off)
        rms = sqrt(mean(g^2 / v))             per tensor (update clipping; `update_clip` = 0 turns it off)
        step = lr_t / max(1, rms / update_clip) / (1 - b1^t)
        p <- p (1 - d_t)                      decoupled weight decay, before the update (below)
        p <- p - step * atan2(m, sqrt(v) / sqrt(1 - b2^t))

    The update is bounded and scale-invariant and needs no epsilon; the bias corrections apply on
    top of the running init, as in the released code. The decay d_t of a group with weight decay
    wd is `lr_t * wd` when the group's `decay_reference_lr` is None (torch AdamW's form), else
    `lr_t / decay_reference_lr * wd`: the released form, which follows the schedule but not the
    size of the learning rate (4e-5 per step at the peak for the 3.5B run's wd = 4e-5). The decay
    uses the scheduled rate, not the clipped or bias-corrected step.

    Under ZeRO the optimizer sees, per parameter group, one flat partition of many tensors (and
    other ranks hold the rest of some of them). `set_flat_layout` says where each tensor lies, and
    the rms is then taken per TENSOR across all ranks (one all-reduce of a vector of per-tensor
    sums per group and step), as without ZeRO; without a layout a flat partition would be clipped
    as one tensor (ZeRO 1 and 2 would then clip per group and rank).
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.95), weight_decay: float = 0.0, update_clip: float = 1.0,
                 eps: float = 1e-6, decay_reference_lr: float | None = None):
        if lr <= 0 or not all(0 <= b < 1 for b in betas) or weight_decay < 0 or update_clip < 0 or eps < 0:
            raise ValueError(f"bad AdamAtan2 settings lr={lr} betas={betas} wd={weight_decay} clip={update_clip} "
                             f"eps={eps}")
        if decay_reference_lr is not None and decay_reference_lr <= 0:
            raise ValueError(f"decay_reference_lr must be > 0, got {decay_reference_lr}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, update_clip=update_clip,
                                      eps=eps, decay_reference_lr=decay_reference_lr))
        # id(flat parameter) -> (that parameter, its layout). Keyed by the tensor, not by the group's
        # index: DeepSpeed steps one group at a time by swapping param_groups for a one-group list.
        self.flat_layouts: dict[int, tuple[torch.Tensor, FlatLayout]] = {}

    def set_flat_layout(self, group_index: int, layout: FlatLayout) -> None:
        params = self.param_groups[group_index]["params"]
        if len(params) != 1 or params[0].numel() != sum(length for _, length in layout.runs):
            raise ValueError(f"parameter group {group_index}: the layout covers {sum(n for _, n in layout.runs)} "
                             f"elements, the group holds {[p.numel() for p in params]}")
        self.flat_layouts[id(params[0])] = (params[0], layout)

    @staticmethod
    def decay_factor(group: dict) -> float:
        """1 - d_t: what a decayed weight is multiplied by this step."""
        reference = group.get("decay_reference_lr")
        lr = group["lr"] / reference if reference else group["lr"]
        return 1 - lr * group["weight_decay"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.to(torch.float32)
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = grad.clone()
                    state["exp_avg_sq"] = grad * grad
                else:
                    state["exp_avg"].lerp_(grad, 1 - beta1)
                    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if group["update_clip"] > 0 and group["eps"] > 0:
                    v.clamp_(min=group["eps"] ** 2)  # in place, as released: the floor stays in v
                t = int(state["step"])
                bias1, bias2_sqrt = 1 - beta1 ** t, math.sqrt(1 - beta2 ** t)
                if self.flat_layouts:
                    flat = self.flat_layouts.get(id(p))
                    if flat is None or flat[0] is not p:  # never clip a flat partition as one tensor unseen
                        raise RuntimeError("adam-atan2: a parameter without its flat layout (DeepSpeed replaced "
                                           "its flat partitions after the layouts were attached)")
                    self._flat_update(p, grad, m, v, group, flat[1], bias1, bias2_sqrt)
                    continue
                step_size = group["lr"]
                if group["update_clip"] > 0:
                    rms = (grad * grad / v.clamp_min(torch.finfo(torch.float32).tiny)).mean().sqrt().item()
                    step_size = step_size / max(1.0, rms / group["update_clip"])
                if group["weight_decay"]:
                    p.mul_(self.decay_factor(group))
                p.add_(torch.atan2(m, v.sqrt() / bias2_sqrt).to(p.dtype), alpha=-step_size / bias1)
        return loss

    def _flat_update(self, p, grad, m, v, group, layout: FlatLayout, bias1: float, bias2_sqrt: float) -> None:
        """The per-tensor step on a flat partition: every run of tensor k gets tensor k's factor."""
        import torch.distributed as dist

        owners = layout.owners
        factor = torch.ones(len(layout.tensor_numels), dtype=torch.float32, device=p.device)
        if group["update_clip"] > 0 and owners:
            ratio = grad * grad / v.clamp_min(torch.finfo(torch.float32).tiny)
            sums = torch.zeros(len(layout.tensor_numels), dtype=torch.float64, device=p.device)
            sums.index_add_(0, layout.owner_index.to(p.device),
                            torch.stack([ratio.narrow(0, start, n).sum(dtype=torch.float64) for _, start, n in owners]))
            if layout.process_group is not None and dist.get_world_size(layout.process_group) > 1:
                dist.all_reduce(sums, group=layout.process_group)  # the parts of a tensor on other ranks
            rms = (sums / layout.numels.to(p.device)).sqrt()
            factor = (1.0 / torch.clamp(rms / group["update_clip"], min=1.0)).to(torch.float32)
        if group["weight_decay"]:
            p.mul_(self.decay_factor(group))  # the same for every tensor of the group (padding stays 0)
        update = torch.atan2(m, v.sqrt() / bias2_sqrt)
        for k, start, n in owners:
            step_size = group["lr"] * factor[k] / bias1
            p.narrow(0, start, n).add_(update.narrow(0, start, n).to(p.dtype) * -step_size)


def build_optimizer(model: torch.nn.Module, config: OptimConfig, device_type: str = "cpu") -> torch.optim.Optimizer:
    """AdamW fused (optim.fused; by default on GPUs) reads and writes about 28 bytes per parameter
    per step, the one-op-at-a-time loop about 70: at 3.5B parameters ~25 ms instead of ~65 ms on an
    H200. On the CPU the loop stays the reference the tests compare DeepSpeed against bit for bit."""
    fused = config.fused if config.fused is not None else device_type == "cuda"
    if config.name == "adamw":
        # torch's AdamW decays by lr_t * wd: the schedule form (lr_t / lr_peak) * wd is the same
        # formula with wd / lr_peak
        wd = config.weight_decay / config.lr if config.weight_decay_scaling == "schedule" else config.weight_decay
        return torch.optim.AdamW(parameter_groups(model, wd), lr=config.lr, betas=config.betas, eps=config.eps,
                                 **({"fused": True} if fused else {"foreach": False}))
    if config.name == "adam-atan2":
        reference = config.lr if config.weight_decay_scaling == "schedule" else None
        return AdamAtan2(parameter_groups(model, config.weight_decay), lr=config.lr, betas=config.betas,
                         update_clip=config.update_clip, eps=config.atan2_eps, decay_reference_lr=reference)
    raise ValueError(f"unknown optimizer {config.name!r}")


def skip_non_finite_steps(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Make `optimizer` skip a step whose gradients hold inf or NaN, and say so in `.overflow`.

    ZeRO stages 1-3 do this inside DeepSpeed; at stage 0 DeepSpeed steps the client optimizer
    directly, after reducing the gradients, so every rank takes the same decision here. The engine
    reads `.overflow`, counts the step as skipped and clears the gradients."""
    base = type(optimizer)

    class SkipNonFinite(base):
        def step(self, closure=None):
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            self.overflow = bool(grads) and not bool(torch.stack([g.isfinite().all() for g in grads]).all())
            return None if self.overflow else super().step(closure)

    SkipNonFinite.__name__ = SkipNonFinite.__qualname__ = f"SkipNonFinite{base.__name__}"
    optimizer.__class__ = SkipNonFinite
    optimizer.overflow = False
    return optimizer


class LRSchedule:
    """Linear warm-up to the peak, then constant, cosine, or trapezoid (warmup-stable-decay).

    Trapezoid cools down linearly to min_lr_ratio over `cooldown_steps` ending at max_steps, or from
    `cooldown_start` when a "cool down now" request fixed it (the trainer stores it in checkpoints).
    """

    def __init__(self, config: ScheduleConfig, peak_lr: float, max_steps: int):
        self.config, self.peak_lr, self.max_steps = config, peak_lr, max_steps

    def __call__(self, step: int, cooldown_start: int | None = None) -> float:
        c, peak = self.config, self.peak_lr
        low = peak * c.min_lr_ratio
        if step < c.warmup_steps:
            return peak * (step + 1) / c.warmup_steps
        if c.name == "constant":
            return peak
        if c.name == "cosine":
            progress = min(1.0, (step - c.warmup_steps) / max(1, self.max_steps - c.warmup_steps))
            return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * progress))
        if c.name == "trapezoid":
            if cooldown_start is not None:
                start, length = cooldown_start, max(1, c.cooldown_steps or (self.max_steps - cooldown_start))
            else:
                start, length = self.max_steps - c.cooldown_steps, c.cooldown_steps
            if length <= 0 or step < start:
                return peak
            return peak + (low - peak) * min(1.0, (step - start + 1) / length)
        raise ValueError(f"unknown schedule {c.name!r}")


def attach_flat_layouts(zero_optimizer, inner: torch.optim.Optimizer, log=print) -> str:
    """Tell an AdamAtan2 inside DeepSpeed's ZeRO 1/2 or bf16 optimizer where each tensor lies in
    its flat partitions, so its update clipping stays per tensor. Returns what was done."""
    if not isinstance(inner, AdamAtan2):
        return "not adam-atan2"
    import torch.distributed as dist
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(zero_optimizer, DeepSpeedZeroOptimizer):
        groups = [(zero_optimizer.round_robin_bit16_groups[i], zero_optimizer.round_robin_bit16_padding[i],
                   zero_optimizer.partition_size[i], zero_optimizer.single_partition_of_fp32_groups[i],
                   zero_optimizer.real_dp_process_group[i]) for i in range(len(inner.param_groups))]
    elif isinstance(zero_optimizer, BF16_Optimizer):
        groups = [(zero_optimizer.bf16_groups[i], [0] * len(zero_optimizer.bf16_groups[i]),
                   zero_optimizer.fp32_groups_flat_partition[i].numel(), zero_optimizer.fp32_groups_flat_partition[i],
                   zero_optimizer.real_dp_process_group[i]) for i in range(len(inner.param_groups))]
    elif isinstance(zero_optimizer, DeepSpeedZeroOptimizer_Stage3):
        # Stage 3 cuts sub-groups of its own; their layout is not mapped yet. The paper's run used
        # no ZeRO 3 (its model fits data parallelism), so this stays a stated deviation.
        if dist.get_rank() == 0:
            log("[optim] adam-atan2 under ZeRO 3: update clipping acts per flat sub-group partition, not per "
                "tensor (a deviation from the paper's per-tensor clipping; use ZeRO 0-2 to keep it)")
        return "zero 3: per partition"
    else:
        return "no flattening"
    for i, (tensors, paddings, partition_size, flat, process_group) in enumerate(groups):
        if inner.param_groups[i]["params"][0] is not flat:
            raise RuntimeError(f"DeepSpeed's optimizer layout is not the one rdhpc knows (group {i}); "
                               "adam-atan2 cannot clip per tensor with this DeepSpeed version")
        runs = flat_layout([t.numel() for t in tensors], list(paddings), partition_size,
                           dist.get_rank(group=process_group))
        inner.set_flat_layout(i, FlatLayout(runs, [t.numel() for t in tensors], process_group))
    return "per tensor across ranks"
