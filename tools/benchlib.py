"""What the training benchmarks share (bench_train.py, bench_trainer_overhead.py): one rank's
process-group environment, the plain PyTorch step, the engine step and the step timer."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def single_rank_environment(cpu: bool):
    """RANK, WORLD_SIZE, LOCAL_RANK and a loopback MASTER_ADDR/PORT of a one-process group: without
    one of them DeepSpeed runs its own MPI discovery and may take an external address."""
    from rdhpc.distributed.ranks import free_port

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def plain_step(model, optimizer, micro_batches, num_steps, grad_clip: float, autocast_dtype=None):
    """forward and backward of every micro-batch, gradient clipping, optimizer step: the training
    step without DeepSpeed. `autocast_dtype`: bf16 autocast over float32 weights (the paper's
    recipe). Returns the last micro-batch's loss (a tensor: no synchronisation)."""
    import torch

    optimizer.zero_grad(set_to_none=True)
    for inputs, labels in micro_batches:
        with torch.autocast(inputs.device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            loss = model(inputs, num_steps=num_steps, labels=labels, return_logits=False).loss
        loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach()


def engine_step(engine, micro_batches, num_steps):
    """The trainer's step on the DeepSpeed engine: forward, engine.backward and engine.step per
    micro-batch (the engine steps the optimizer at the accumulation boundary)."""
    for inputs, labels in micro_batches:
        loss = engine(inputs, num_steps=num_steps, labels=labels, return_logits=False).loss
        engine.backward(loss)
        engine.step()
    return loss.detach()


def time_steps(step_fn, num_steps: int, device, before_step=None) -> tuple[list[float], list]:
    """(seconds of every step, what every step returned); drop the warm-up steps from the first list
    yourself. On a GPU each step is timed with CUDA events on the current stream (no synchronisation
    between steps: a step the host cannot keep fed shows as GPU idle time, which is real); on the
    CPU with perf_counter. `before_step(s)` runs outside the timed region."""
    import torch

    cuda = getattr(device, "type", device) == "cuda"
    results, times, events = [], [], []
    for s in range(num_steps):
        if before_step is not None:
            before_step(s)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            results.append(step_fn(s))
            end.record()
            events.append((start, end))
        else:
            started = time.perf_counter()
            results.append(step_fn(s))
            times.append(time.perf_counter() - started)
    if cuda:
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) / 1000 for start, end in events]
    return times, results
