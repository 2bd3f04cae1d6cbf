"""Honest throughput: model FLOPs counted for the depth actually sampled in a step; and the one sink
of a run's metrics (MetricsSink: TensorBoard, metrics.jsonl, the log, on the main rank only), and
the run's log file (RunLog: RUN_DIR/train.log).

The paper's trainer logged MFU for the MEAN depth, so a step at r = 90 and one at r = 5 reported the
same FLOPs. Here a step with n iterations without gradient and k with gradient counts:
    prelude, coda, head:  forward + backward (3 x 2 flops per parameter per token)
    core and adapter:     forward for n + k iterations, backward for the last k (2 x 2 per parameter)
    attention scores:     4 * T * h per layer and token forward (QK^T and AV, full T: no causal discount,
                          the usual convention), x3 where the layer is back-propagated; `causal=True`
                          counts half (the work a causal kernel does: the GPU benchmark's figures count so)
No recompute is counted: activation checkpointing costs time, not model FLOPs.
"""

from __future__ import annotations

from rdhpc.model.config import ModelConfig


def _block_params(c: ModelConfig) -> int:
    return 4 * c.hidden_size ** 2 + 3 * c.hidden_size * c.intermediate_size


def flops_per_token(c: ModelConfig, seq_len: int, n_no_grad: int, n_grad: int, causal: bool = False) -> float:
    h = c.hidden_size
    attention_fwd = (2 if causal else 4) * seq_len * h  # per layer per token
    outer_layers = c.num_prelude_layers + c.num_coda_layers
    outer = outer_layers * _block_params(c) + c.padded_vocab_size * h  # + the head (the embedding lookup is free)
    core = c.num_core_layers * _block_params(c) + (2 * h * h if c.injection_type == "linear" else 0)
    core_attention = c.num_core_layers * attention_fwd
    flops = 3 * (2 * outer + outer_layers * attention_fwd)  # forward + backward
    flops += (n_no_grad + n_grad) * (2 * core + core_attention)  # forward of every iteration
    flops += n_grad * 2 * (2 * core + core_attention)  # backward of the last k
    return float(flops)


# Dense peak TFLOP/s per device in the training precision (bf16 tensor cores), by name as the driver
# reports it. One MI250X package is two dies (GCDs), each its own device to PyTorch: 191.5 each.
PEAK_TFLOPS_BY_NAME = [
    ("MI250X", 191.5), ("MI250", 181.0), ("MI300X", 1307.4), ("MI300A", 980.6), ("MI325X", 1307.4),
    ("GH200", 989.4), ("H200", 989.4), ("H100", 989.4), ("H800", 989.4), ("B200", 2250.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("V100", 125.0),
]


def peak_tflops(device, dtype, configured: float | None, preflight: dict | None = None) -> tuple[float, str]:
    """(peak TFLOP/s per device for MFU, where the figure comes from): the configured figure, else
    the datasheet's for a GPU the table knows, else ONE measurement: the pre-flight's median GEMM
    over the ranks when it ran in this dtype (the figure its log shows), or a GEMM of the same
    size timed here."""
    from rdhpc.distributed.preflight import gemm_size, timed_gemm_tflops

    if configured is not None:
        return configured, "train.peak_tflops_per_device"
    name = "this CPU"
    if device.type == "cuda":
        import torch

        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_TFLOPS_BY_NAME:
            if key in name.upper():
                return value, f"datasheet peak of {name}"
    dtype_name = str(dtype).replace("torch.", "")
    if preflight is not None and preflight["gemm"]["dtype"] == dtype_name:
        n = preflight["gemm"]["n"]
        return preflight["gemm"]["median_tflops"], f"the pre-flight's median {dtype_name} GEMM {n}^3 on {name}"
    n = gemm_size(device)
    return timed_gemm_tflops(device, n, dtype, repeats=10), f"a {dtype_name} GEMM {n}^3 timed on {name}"


class MetricsSink:
    """Where a run's numbers go, decided once: on the main rank, TensorBoard scalars
    (RUN_DIR/tensorboard), one JSON line per optimizer step (RUN_DIR/metrics.jsonl) and the log; on
    every other rank, nowhere (as torchtitan's metrics logger). Callers never ask which rank they are."""

    def __init__(self, run_folder, is_main: bool, tensorboard: bool, log=print):
        self.active = is_main
        self.run_folder = run_folder
        self.log = log if is_main else (lambda *a, **k: None)
        self.writer = None
        if is_main and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_folder.tensorboard))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()

    def images(self, step: int, images: dict) -> None:
        """{tag: a function drawing an (H, W, 3) uint8 image}: drawn only here, on the main rank."""
        if self.writer is not None and images:
            for tag, draw in images.items():
                self.writer.add_image(tag, draw(), step, dataformats="HWC")
            self.writer.flush()

    def step_record(self, record: dict) -> None:
        """One line of metrics.jsonl: what tests, `rdhpc status` and reports read back."""
        if self.active:
            import json

            with open(self.run_folder.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class RunLog:
    """The main rank's log: printed as before and, once the run folder is this trainer's
    (`open`, after its lock is taken), appended to RUN_DIR/train.log with the time, segment after
    segment, so a local run has its log where `rdhpc status RUN_DIR` points (a Slurm job also has
    its per-task logs)."""

    def __init__(self, log=print):
        self.log, self.file = log, None  # log None: print nothing (the other ranks)

    def open(self, path) -> None:
        self.file = open(path, "a", buffering=1)  # line-buffered: a killed run keeps its last line

    def __call__(self, *parts, **kwargs) -> None:
        if self.log is not None:
            self.log(*parts, **kwargs)
        self.to_file(*parts)

    def to_file(self, *parts) -> None:
        """Into train.log only (e.g. the error the command line prints itself)."""
        if self.file is not None:
            import time

            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            for line in " ".join(str(p) for p in parts).splitlines() or [""]:
                self.file.write(f"{stamp} {line}\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
