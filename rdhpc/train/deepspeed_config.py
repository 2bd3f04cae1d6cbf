"""The one function that builds the DeepSpeed config of a run. It is passed explicitly to
deepspeed.initialize and saved as JSON next to every checkpoint; nothing else sets DeepSpeed options.
"""

from __future__ import annotations

from rdhpc.config.loader import ConfigError
from rdhpc.config.schema import RunConfig

# steps_per_print would make DeepSpeed print its own progress lines; rdhpc logs itself.
_NEVER = 2 ** 31 - 1


def build_deepspeed_config(run: RunConfig, world_size: int, load_universal: bool = False) -> dict:
    """`load_universal`: the run resumes from a universal checkpoint (written by another number of
    ranks and converted with DeepSpeed's ds_to_universal)."""
    train, zero = run.train, run.zero
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise ConfigError([f"train.global_batch_size: {train.global_batch_size} is not a multiple of "
                           f"train.micro_batch_size x ranks = {train.micro_batch_size} x {world_size}"])
    zero_section = {
        "stage": zero.stage,
        "reduce_bucket_size": zero.reduce_bucket_size,  # the paper reduced gradients in fixed 64 MB chunks
        "allgather_bucket_size": zero.allgather_bucket_size,
        "overlap_comm": zero.overlap_comm,
        "contiguous_gradients": zero.contiguous_gradients,
    }
    if zero.offload_optimizer:
        zero_section["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if zero.stage == 3:
        zero_section["stage3_param_persistence_threshold"] = zero.stage3_param_persistence_threshold
        # Its default swaps F.linear for DeepSpeed's own autograd function, which differs by ~1e-7.
        zero_section["memory_efficient_linear"] = False
    config = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.global_batch_size // per_step,
        "gradient_clipping": run.optim.grad_clip,
        "zero_optimization": zero_section,
        "zero_allow_untested_optimizer": True,  # the client optimizers are torch's AdamW and AdamAtan2
        "bf16": {"enabled": train.precision == "bf16"},  # bf16 weights in the engine, fp32 master copy in ZeRO
        "fp16": {"enabled": False},
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
    }
    if train.precision == "bf16-autocast":
        # the paper's precision: float32 weights, bf16 matrix products inside the engine's forward;
        # no module is "lower-precision safe", so every gradient is reduced in float32 (DeepSpeed's
        # default would reduce the gradients of Linear layers in bf16)
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    if train.precision == "bf16":
        # float32 master weights and optimizer state are ZeRO's bf16 default; the paper also reduced
        # and accumulated gradients in float32.
        config["communication_data_type"] = "fp32"
        config["data_types"] = {"grad_accum_dtype": "fp32"}
        if train.bf16_immediate_grad_update:
            config["bf16"]["immediate_grad_update"] = True
    return config
