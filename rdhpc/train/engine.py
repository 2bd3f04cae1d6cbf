"""From a model to the training step users run: compilation, attention kernels and the DeepSpeed
engine, in one place shared by the trainer and tools/bench_train.py (the benchmark times exactly
the trainer's step). The model package itself knows nothing of this (as torchtitan's parallelize.py).
"""

from __future__ import annotations

import contextlib
import importlib
import warnings

import torch

from rdhpc.config.schema import RunConfig
from rdhpc.train.deepspeed_config import build_deepspeed_config
from rdhpc.train.optim import attach_flat_layouts, build_optimizer, skip_non_finite_steps


def quiet_deepspeed_deprecations():
    """DeepSpeed 0.19 calls torch APIs that torch 2.13 marks deprecated, once per rank per call
    site: noise in every log, nothing a user can act on."""
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor` is deprecated", category=FutureWarning)


def skip_deepspeed_shm_op():
    """deepspeed.initialize builds a shared-memory op used only for inference all-reduce on CPU; it
    compiles for 30-60 s. Training never uses it."""
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def compile_model(model, scope: str | None, backend: str = "inductor", mode: str | None = None):
    """torch.compile in place, parameter names unchanged (checkpoints stay loadable either way).

    'core': `model.core_iteration` becomes one compiled graph, reused by every iteration of every
    sampled depth (one graph with gradient, one without). 'model': the whole forward, one graph per
    (iterations without, with gradient) split, so only for fixed depths."""
    if scope == "core":
        model.core_iteration = torch.compile(model.core_iteration, backend=backend, mode=mode, fullgraph=True)
    elif scope == "model":
        model.compile(backend=backend, mode=mode)
    elif scope is not None:
        raise ValueError(f"unknown compile scope {scope!r}")
    return model


def attention_kernels(backend: str):
    """A context in which scaled_dot_product_attention may use only the named kernels; 'auto' leaves
    the choice to PyTorch (the only setting that runs on every vendor's GPUs and on the CPU)."""
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel([names[backend]])


def build_engine(run: RunConfig, model: torch.nn.Module, world_size: int, device: torch.device,
                 load_universal: bool = False):
    """(engine, optimizer, DeepSpeed config) for `model` as `run` says: the client optimizer,
    DeepSpeed's engine, then the compile scope applied to the engine's module.
    The process group must exist (deepspeed.init_distributed)."""
    import deepspeed

    ds_config = build_deepspeed_config(run, world_size, load_universal=load_universal)
    optimizer = build_optimizer(model, run.optim, device.type)
    if run.zero.stage == 0:
        optimizer = skip_non_finite_steps(optimizer)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    # adam-atan2's per-tensor update clipping, on the flat partitions ZeRO and bf16 hand it
    attach_flat_layouts(engine.optimizer, getattr(engine.optimizer, "optimizer", engine.optimizer))
    compile_model(engine.module, run.train.compile_scope, run.train.compile_backend)
    return engine, optimizer, ds_config
