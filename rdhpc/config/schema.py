"""The run configuration: one typed dataclass per section, each field documented where it is declared.

YAML files set any subset of fields; `--set section.key=value` overrides the file; the file
overrides these defaults. rdhpc.config.loader validates everything at load and reports every
problem at once. The resolved config is saved next to every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from rdhpc.model.config import ModelConfig
from rdhpc.validation import check_bounds, check_choice

PRECISIONS = ("bf16", "bf16-autocast", "fp32")
DEVICES = ("auto", "cpu", "cuda")
WEIGHT_DECAY_SCALINGS = {
    "lr": "p <- p (1 - lr_t * weight_decay): torch AdamW's decoupled decay",
    "schedule": "p <- p (1 - lr_t / optim.lr * weight_decay): the released Adam-atan2's decay",
}
OPTIMIZERS = {
    "adamw": "torch.optim.AdamW (nothing to compile on CPU)",
    "adam-atan2": "the paper's Adam variant: atan2 update, update clipping, running init, decoupled decay",
}
SCHEDULES = {
    "constant": "linear warm-up, then constant",
    "cosine": "linear warm-up, then cosine decay to min_lr_ratio * lr at total_steps",
    "trapezoid": "linear warm-up, constant, linear cool-down over cooldown_steps before total_steps "
                 "(warmup-stable-decay); also triggered early by a cool-down request file",
}
ON_DATA_EXHAUSTED = ("stop", "new_epoch")
# train.compile: what torch.compile wraps (rdhpc.train.engine.compile_model). true means "core".
COMPILE_SCOPES = {
    False: "nothing: eager",
    True: "the same as 'core'",
    "core": "one core iteration, one graph reused by every iteration of any sampled depth (with and "
            "without gradient: two graphs)",
    "model": "the whole forward; a new graph for every new (iterations without, with gradient): for a "
             "fixed depth (benchmarks), not for the sampled depths of training",
}
# train.sdpa_backend: PyTorch's attention kernels allowed (torch.nn.attention.sdpa_kernel).
SDPA_BACKENDS = {
    "auto": "PyTorch's own choice (flash or cuDNN on NVIDIA, AOTriton flash on ROCm, flash or math on CPU)",
    "flash": "FlashAttention-2 kernels (NVIDIA sm80+, ROCm through AOTriton, CPU)",
    "cudnn": "cuDNN's fused attention (NVIDIA only)",
    "efficient": "memory-efficient attention (NVIDIA, ROCm)",
    "math": "the unfused reference: materialises the (T, T) scores",
}


SOURCE_NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass
class SourceConfig:
    """One dataset of a mixture (data.sources)."""

    name: str = ""
    """Letters, digits, _ and -: the TensorBoard tags `val/<name>/loss_r{d}` and `data/<name>/tokens`,
    and what a checkpoint records; the permutation of its rows is seeded from it."""
    dir: str = ""
    """A `rdhpc prep shards` output folder; its train split is blended, its val split validated."""
    weight: float = 1.0
    """Relative weight (> 0): the source's share of every window of data.mixture_window global batches
    is weight / (sum of weights), to within one row."""


@dataclass
class DataConfig:
    train_dir: str | None = None
    """Folder of training shards written by `rdhpc prep shards` (its manifest.json is checked): the
    one-source run (or give data.sources)."""
    val_dir: str | None = None
    """Folder of validation shards; defaults to the validation split of train_dir's manifest."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Several `rdhpc prep shards` folders blended by weight at train time, instead of train_dir:
    a list of {name, dir, weight}, all made with one tokenizer and seq_len (checked at start). Each
    global batch takes rows from each source in proportion, exactly over every window of
    mixture_window global batches; the order is a function of (shuffle_seed, the weights, step),
    the same on any rank count and after a resume. A weight may change on resume (logged; the order
    follows the new weights from that step; the checkpoint records every weight used). Each source
    is validated on its own val split (`val/<name>/loss_r{d}`); tokens seen per source are logged
    (`data/<name>/tokens`). When a source runs out, on_exhausted decides: 'stop' ends the run before
    any source repeats a row, 'new_epoch' reshuffles that source alone. rdhpc.data.mixture has the
    details."""
    mixture_window: int = 16
    """data.sources: the window, in global batches, over which every source gets exactly its share
    (largest remainder of window x global batch x weight / total weight rows)."""
    shuffle_seed: int = 1234
    """Seed of the global row permutation shared by all ranks."""
    prefetch_batches: int = 4
    """Batches prepared ahead of the step by a background thread."""
    on_exhausted: str = "stop"
    """What happens when the data runs out: 'stop' ends the run cleanly, 'new_epoch' reshuffles."""
    verify_checksums: bool | str = "once"
    """Read every shard once before step 1, spread over the ranks, checking its header, its sha256
    against the manifest and its token ids against the vocabulary: 'once' (the first start of a run folder;
    the run folder records what was verified, a requeued segment skips it), 'always' (every
    start; also `true`) or 'never' (`false`). About 1 GB/s per rank here: 1.6 TB of shards over
    4096 ranks is well under a second of hashing each. The cheap checks (version, dtype, seq_len,
    tokenizer hash, row count) also run whenever a rank opens a shard, which it does when it first
    reads one of its rows (start-up reads the manifest only), and every batch's token ids are checked
    anyway."""

    @property
    def verify_mode(self) -> str:
        return {True: "always", False: "never"}.get(self.verify_checksums, self.verify_checksums)

    def problems(self, prefix="data"):
        if self.verify_mode not in ("once", "always", "never"):
            return [f"{prefix}.verify_checksums: unknown value {self.verify_checksums!r}; choose one of 'once', "
                    f"'always' (true), 'never' (false)"]
        return (check_choice(self, prefix, "on_exhausted", ON_DATA_EXHAUSTED)
                + check_bounds(self, prefix, non_negative=("prefetch_batches",), positive=("mixture_window",))
                + self.source_problems(prefix))

    def source_problems(self, prefix="data") -> list[str]:
        if not self.sources:
            return []
        out = []
        if self.train_dir is not None:
            out.append(f"{prefix}.sources: not with {prefix}.train_dir (the one-source shorthand): give one or "
                       f"the other")
        if self.val_dir is not None:
            out.append(f"{prefix}.val_dir: not with {prefix}.sources (each source is validated on its own val split)")
        seen = set()
        for i, source in enumerate(self.sources):
            key = f"{prefix}.sources[{i}]"
            if not SOURCE_NAME.fullmatch(source.name):
                out.append(f"{key}.name: {source.name!r} must be letters, digits, _ or - (it names TensorBoard tags)")
            elif source.name in seen:
                out.append(f"{key}.name: {source.name!r} is given twice")
            seen.add(source.name)
            if not source.dir:
                out.append(f"{key}.dir: required (a folder made by `rdhpc prep shards`)")
            if not (math.isfinite(source.weight) and source.weight > 0):
                out.append(f"{key}.weight: must be a finite number > 0, got {source.weight}")
        return out

    def first_dir(self) -> str | None:
        """The folder whose manifest names the run's tokenizer (train_dir, or the first source's)."""
        return self.train_dir or (self.sources[0].dir if self.sources else None)


@dataclass
class OptimConfig:
    name: str = "adamw"
    """Optimizer: 'adamw' or 'adam-atan2' (the paper's)."""
    lr: float = 4e-5
    """Peak learning rate (4e-5 in the 3.5B run)."""
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 4e-5
    """Decoupled weight decay of every weight except the norms and qk_bias (the embedding and the
    tied head are decayed, as in the released code); its formula is weight_decay_scaling's."""
    weight_decay_scaling: str = "lr"
    """How the decay follows the learning rate, per step and decayed weight p (lr_t the scheduled
    rate): 'lr': p <- p (1 - lr_t * weight_decay), torch AdamW's form (weight_decay is per unit
    learning rate: 4e-5 x 4e-5 = 1.6e-9 per step would be no decay at all); 'schedule':
    p <- p (1 - lr_t / optim.lr * weight_decay), the released Adam-atan2's form (weight_decay is the
    decay per step at the peak rate, following warm-up and cool-down)."""
    eps: float = 1e-8
    """AdamW epsilon (the atan2 update needs none; see atan2_eps)."""
    atan2_eps: float = 1e-6
    """adam-atan2: where it clips updates, the released code clamps v in place to at least
    atan2_eps^2, which floors sqrt(v) at atan2_eps inside the atan2 (an effective epsilon for
    elements whose gradients are below ~1e-6); 1e-6 is the released run's; 0 turns the floor off."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping; 0 disables."""
    update_clip: float = 1.0
    """adam-atan2: cap on the per-tensor rms of g^2 / v."""
    fused: bool | None = None
    """adamw: torch's fused kernel (one pass over weight, gradient and both moments per tensor);
    None: on GPUs only (on the CPU the one-op-at-a-time loop stays the bit-exact reference)."""

    def problems(self, prefix="optim"):
        out = check_choice(self, prefix, "name", OPTIMIZERS) + check_bounds(
            self, prefix, positive=("lr",), non_negative=("weight_decay", "eps", "atan2_eps", "grad_clip", "update_clip"))
        out += check_choice(self, prefix, "weight_decay_scaling", WEIGHT_DECAY_SCALINGS)
        if self.fused and self.name != "adamw":
            out.append(f"{prefix}.fused: only optim.name 'adamw' has a fused kernel, got {self.name!r}")
        if not all(0 <= b < 1 for b in self.betas):
            out.append(f"{prefix}.betas: each must be in [0, 1), got {list(self.betas)}")
        return out


@dataclass
class ScheduleConfig:
    name: str = "trapezoid"
    warmup_steps: int = 4096
    cooldown_steps: int = 0
    """trapezoid: length of the linear cool-down that ends at train.max_steps."""
    min_lr_ratio: float = 0.0
    """Final learning rate of cosine and cool-down, as a fraction of optim.lr."""

    def problems(self, prefix="schedule"):
        out = check_choice(self, prefix, "name", SCHEDULES) + check_bounds(
            self, prefix, non_negative=("warmup_steps", "cooldown_steps"))
        if not 0 <= self.min_lr_ratio <= 1:
            out.append(f"{prefix}.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        return out


@dataclass
class TrainConfig:
    global_batch_size: int = 4096
    """Sequences per optimizer step over all ranks (fixed: accumulation fills the gap)."""
    micro_batch_size: int = 1
    """Sequences per rank per forward pass."""
    max_steps: int = 47000
    seed: int = 0
    """Seeds the model init and the depth sampler (drawn from (seed, step) on every rank)."""
    precision: str = "bf16"
    """'bf16': DeepSpeed holds the weights in bf16 and the model computes in bf16 (norms, RoPE and
    the loss in float32); ZeRO keeps float32 master weights, optimizer state and gradient
    accumulation; the residual stream and the latent state are bf16. 'bf16-autocast': the paper's
    precision: float32 weights under torch's bf16 autocast (DeepSpeed's torch_autocast): matrix
    products in bf16, the residual stream, the norms' outputs and the latent state s_i in float32
    through every iteration, gradients reduced in float32; about twice the weight memory of 'bf16'.
    'fp32': everything in float32."""
    device: str = "auto"
    """'auto' picks the GPU when there is one, else the CPU (gloo)."""
    compile: bool | str = False
    """torch.compile: false, 'core' (one core iteration as one graph; also `true`) or 'model' (the
    whole forward, recompiled for every new depth split). Costs minutes of compilation at start."""
    compile_backend: str = "inductor"
    """torch.compile backend ('inductor' generates kernels; 'aot_eager' only traces, for tests)."""
    sdpa_backend: str = "auto"
    """Attention kernels allowed: 'auto' (PyTorch chooses), 'flash', 'cudnn' (NVIDIA only),
    'efficient' or 'math'."""
    bf16_immediate_grad_update: bool = False
    """bf16 with ZeRO 1: add each bf16 gradient into the float32 accumulation buffer as soon as
    backward produces it and free it (DeepSpeed's bf16.immediate_grad_update), instead of keeping
    every bf16 gradient until the end of backward: one bf16 copy of the weights less at the peak."""
    log_interval: int = 10
    max_consecutive_skips: int = 5
    """Steps with a non-finite loss or gradient are skipped; this many in a row stop the run."""
    peak_tflops_per_device: float | None = None
    """Dense peak used for MFU, e.g. 989 for H100/H200 (bf16), 191.5 per MI250X die. Unset: looked up
    from the GPU's name, or measured with a timed GEMM where the device is unknown (CPUs)."""
    collective_timeout_s: float = 600.0
    """A collective that waits longer fails on every rank (also bounds ZeRO's cloned groups)."""
    heartbeat_interval_s: float = 5.0
    """Every rank rewrites RUN_DIR/heartbeat/rank{r}.json this often; failures name silent ranks."""
    preflight: bool = True
    """At every start: each rank's device, a timed all-reduce per size and a timed GEMM per device,
    reported in the log, naming a rank far below the median (rdhpc.distributed.preflight)."""
    stall_timeout_s: float = 1800.0
    """A rank whose training loop makes no progress this long ends itself (status 3), naming the
    ranks at fault; 0 disables. Keep it above collective_timeout_s and the longest checkpoint save."""

    def problems(self, prefix="train"):
        out = check_bounds(self, prefix, positive=(
            "global_batch_size", "micro_batch_size", "max_steps", "log_interval", "max_consecutive_skips",
            "collective_timeout_s", "heartbeat_interval_s"), non_negative=("stall_timeout_s",))
        if self.peak_tflops_per_device is not None and not self.peak_tflops_per_device > 0:
            out.append(f"{prefix}.peak_tflops_per_device: must be > 0 or unset, got {self.peak_tflops_per_device}")
        out += check_choice(self, prefix, "precision", PRECISIONS) + check_choice(self, prefix, "device", DEVICES)
        out += check_choice(self, prefix, "sdpa_backend", SDPA_BACKENDS)
        if self.compile not in COMPILE_SCOPES:
            out.append(f"{prefix}.compile: unknown value {self.compile!r}; choose one of false, true, 'core', 'model'")
        if self.micro_batch_size > 0 and self.global_batch_size % self.micro_batch_size:
            out.append(f"{prefix}.global_batch_size: {self.global_batch_size} is not a multiple of "
                       f"{prefix}.micro_batch_size = {self.micro_batch_size}")
        return out

    @property
    def compile_scope(self) -> str | None:
        """None, 'core' or 'model' (`compile: true` is 'core')."""
        return {False: None, True: "core"}.get(self.compile, self.compile)


@dataclass
class TaskConfig:
    """One task evaluated in the loop (eval.tasks): a file of examples, rdhpc.eval.tasks."""

    file: str = ""
    """JSON lines: {"prompt", "target"} (generation: greedy exact match, stopping at a newline) or
    {"prompt", "choices", "answer"} (multiple choice: the most likely choice); `rdhpc prep synthetic`
    writes such files."""
    name: str | None = None
    """Letters, digits, _, - and .: the TensorBoard tags `eval/<name>/acc_r{r}` (default: the file's stem)."""
    max_examples: int | None = None
    """The first N examples (default eval.task_examples)."""

    @property
    def label(self) -> str:
        return self.name or Path(self.file).stem


@dataclass
class EvalConfig:
    """Evaluation inside the training loop (rdhpc.eval.in_loop): every `interval` optimizer steps and
    at the end of the run, on every rank's share of the validation rows, results reduced over ranks."""

    interval: int = 500
    """Evaluate every N optimizer steps (and after the last one)."""
    depths: list[int] = field(default_factory=lambda: [1, 4, 8, 16, 32])
    """Fixed depths of the validation loss (`val/loss_r{r}`): the live test-time scaling curve. One
    trajectory to the deepest depth serves them all."""
    rows: int = 4096
    """Validation rows per evaluation over all ranks (`rows` rows spread evenly over the split, so
    that they come from many documents, cut into one contiguous part per rank): the same rows, with
    the same noise, whatever the rank count. The paper's run evaluated one row per rank (4096)."""
    tasks: list[TaskConfig] = field(default_factory=list)
    """Task accuracy against depth every `interval` steps (`eval/<task>/acc_r{r}`, and an image of
    accuracy against depth and against the training step): does thinking longer give better answers?"""
    task_depths: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    """Depths of the task accuracy; one trajectory to the deepest serves them all."""
    task_exit_thresholds: list[float] = field(default_factory=list)
    """Early exit (KL between successive depths below the threshold; the paper's 5e-4) up to the
    deepest task depth: its accuracy (`acc_exit{t}`) and the mean depth its answers used (`depth_exit{t}`)."""
    task_examples: int = 256
    """Examples per task (over all ranks): bounds the evaluation's cost, which the log reports and
    the throughput figures leave out."""
    task_max_new_tokens: int = 16
    """A generation target longer than this many tokens counts as wrong, as decoding would stop."""
    task_batch_examples: int = 8
    """Examples per forward (with every multiple-choice candidate)."""
    tokenizer: str | None = None
    """The tokenizer that encodes the tasks (default: the one the training shards' manifest names)."""

    def problems(self, prefix="eval"):
        out = check_bounds(self, prefix, positive=("interval", "rows", "task_examples", "task_max_new_tokens",
                                                    "task_batch_examples"))
        names = [t.label for t in self.tasks]
        for i, task in enumerate(self.tasks):
            where = f"{prefix}.tasks[{i}]"
            if not task.file:
                out.append(f"{where}.file: required (a task file of JSON lines)")
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", task.label or ""):
                out.append(f"{where}.name: {task.label!r} must be letters, digits, _, - or . (a TensorBoard tag)")
            elif names.count(task.label) > 1:
                out.append(f"{where}.name: {task.label!r} is used by another task")
            if task.max_examples is not None and task.max_examples < 1:
                out.append(f"{where}.max_examples: must be >= 1, got {task.max_examples}")
        if self.tasks and (not self.task_depths or min(self.task_depths) < 1):
            out.append(f"{prefix}.task_depths: give depths >= 1, got {self.task_depths}")
        bad = [t for t in self.task_exit_thresholds if not (math.isfinite(t) and t >= 0)]
        if bad:
            out.append(f"{prefix}.task_exit_thresholds: thresholds must be finite and >= 0, got {bad}")
        if not self.depths:
            out.append(f"{prefix}.depths: give at least one depth")
        bad_depths = [d for d in self.depths if d < 1]
        if bad_depths:
            out.append(f"{prefix}.depths: depths must be >= 1, got {bad_depths}")
        return out


@dataclass
class ZeroConfig:
    """DeepSpeed settings; rdhpc.trainer builds the whole DeepSpeed JSON from these in one function."""

    stage: int = 1
    """ZeRO stage 0-3 (the paper sharded optimizer state within a node: stage 1)."""
    reduce_bucket_size: int = 16_777_216
    """Elements per gradient-reduction bucket (16M float32 = the paper's 64 MB chunks)."""
    allgather_bucket_size: int = 16_777_216
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    offload_optimizer: bool = False
    """Keep optimizer state on the CPU (ZeRO-Offload)."""
    stage3_param_persistence_threshold: int = 100_000
    """Stage 3: parameters smaller than this stay unpartitioned."""

    def problems(self, prefix="zero"):
        out = []
        if self.stage not in (0, 1, 2, 3):
            out.append(f"{prefix}.stage: must be 0, 1, 2 or 3, got {self.stage}")
        out += check_bounds(self, prefix, positive=("reduce_bucket_size", "allgather_bucket_size"))
        if self.offload_optimizer and self.stage == 0:
            out.append(f"{prefix}.offload_optimizer: needs ZeRO stage 1 or higher")
        return out


@dataclass
class CheckpointConfig:
    dir: str | None = None
    """Checkpoint folder; defaults to <logging.run_dir>/checkpoints."""
    interval: int = 128
    """Save every N optimizer steps (the paper: 128), plus on preemption and at the end."""
    keep_last: int = 3
    resume: str = "auto"
    """'auto' resumes from the latest complete checkpoint, 'never' starts fresh, or a checkpoint path."""
    init_from: str | None = None
    """Start a fresh run from these weights (optimizer state and step start anew): the released
    Huginn layout (config.json + model.safetensors), a .safetensors file from `rdhpc export`, or a
    DeepSpeed checkpoint of any ZeRO stage. Ignored when the run resumes from its own checkpoint."""

    def problems(self, prefix="checkpoint"):
        return check_bounds(self, prefix, positive=("interval", "keep_last"))


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    """Everything of a run lives here: config, TensorBoard events, checkpoints, logs."""
    tensorboard: bool = True

    def problems(self, prefix="logging"):
        return [] if self.run_dir else [f"{prefix}.run_dir: must not be empty"]


def slurm_time_seconds(text: str) -> int:
    """Slurm's time formats -> seconds: "MM", "MM:SS", "HH:MM:SS", "D-HH", "D-HH:MM", "D-HH:MM:SS"."""
    text = str(text).strip()
    days = 0
    if "-" in text:
        day_part, text = text.split("-", 1)
        days = int(day_part)
        parts = [int(x) for x in text.split(":")]
        if not 1 <= len(parts) <= 3:
            raise ValueError(text)
        parts += [0] * (3 - len(parts))
        hours, minutes, seconds = parts
    else:
        parts = [int(x) for x in text.split(":")]
        if len(parts) == 1:
            hours, minutes, seconds = 0, parts[0], 0
        elif len(parts) == 2:
            hours, (minutes, seconds) = 0, parts
        elif len(parts) == 3:
            hours, minutes, seconds = parts
        else:
            raise ValueError(text)
    if min(days, hours, minutes, seconds) < 0:
        raise ValueError(text)
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


@dataclass
class SlurmConfig:
    """`rdhpc submit`: the job's shape and set-up. A cluster preset (slurm/clusters/NAME.yaml) gives
    the defaults of every key left None here; the command line's --nodes, --time... override both."""

    cluster: str = "local"
    """Preset in slurm/clusters/<name>.yaml (frontier, nvidia, local), a user preset of that name
    in $RDHPC_CLUSTERS_DIR or ~/.config/rdhpc/clusters, or a path to a preset file."""
    nodes: int = 1
    tasks_per_node: int | None = None
    """Ranks per node (None: the preset's, e.g. 8 on Frontier = one per MI250X die)."""
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    time: str = "12:00:00"
    """Time limit per job segment; the run checkpoints stop_margin_s before it and is requeued."""
    account: str | None = None
    partition: str | None = None
    qos: str | None = None
    exclude: str | None = None
    """Nodes to leave out (Slurm host list), e.g. one the pre-flight named as slow."""
    job_name: str = "rdhpc"
    max_segments: int = 32
    """Run at most this many segments (the first plus requeues; the paper's run took 21 of up to 12 h)."""
    max_failure_requeues: int = 3
    """Requeue the job itself at most this many times after a failure that is not the run's own
    (a rank killed, frozen or on a dead node; a broken collective), excluding the host at fault; a
    config error, a bad shard, a NaN stop or a rank's own exception is never requeued. 0: never."""
    stop_margin_s: int | None = None
    """Checkpoint and stop this many seconds before the time limit (None: the preset's; the paper: 300)."""
    env: list[str] = field(default_factory=list)
    """Extra environment of the job, NAME=VALUE each (a ${NAME} in VALUE is expanded in the job)."""
    staging: bool | None = None
    """Node-local staging of the environment (the preset's staging section; None: the preset's default)."""
    python: str | None = None
    """Python of the ranks (None: the preset's, else the one running `rdhpc submit`)."""
    folder: str | None = None
    """Where submitit keeps scripts, pickles and per-task logs (None: <logging.run_dir>/slurm)."""

    def problems(self, prefix="slurm"):
        import re

        out = check_bounds(self, prefix, positive=("nodes", "max_segments"), non_negative=("max_failure_requeues",))
        for name in ("tasks_per_node", "cpus_per_task", "stop_margin_s"):
            value = getattr(self, name)
            if value is not None and value < 1:
                out.append(f"{prefix}.{name}: must be >= 1, got {value}")
        if self.gpus_per_node is not None and self.gpus_per_node < 0:
            out.append(f"{prefix}.gpus_per_node: must be >= 0, got {self.gpus_per_node}")
        try:
            if slurm_time_seconds(self.time) <= 0:
                out.append(f"{prefix}.time: must be positive, got {self.time!r}")
        except ValueError:
            out.append(f"{prefix}.time: {self.time!r} is not a Slurm time (MM, MM:SS, HH:MM:SS, D-HH:MM:SS)")
        if not re.fullmatch(r"[A-Za-z0-9._+-]{1,128}", self.job_name):
            out.append(f"{prefix}.job_name: {self.job_name!r} cannot be a job name: use letters, digits and "
                       f". _ + - (at most 128)")
        for i, item in enumerate(self.env):
            name, sep, _ = item.partition("=")
            if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                out.append(f"{prefix}.env[{i}]: {item!r} is not NAME=VALUE with NAME a valid variable name")
            elif "\0" in item:
                out.append(f"{prefix}.env[{i}]: {name} contains a NUL byte")
        return out


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def with_absolute_paths(self, base: str | Path | None = None) -> "RunConfig":
        """A copy whose paths (PATH_KEYS) are absolute, resolved against `base` (default: the current
        folder, where a relative path given on the command line means something). What a run saves
        (its config.yaml, every checkpoint's config, a submission's snapshot) goes through this, so
        that `rdhpc generate`, `export`, `eval` and a resume find the data and the tokenizer from any
        folder."""
        base = Path(base) if base is not None else Path.cwd()
        sections = {}
        for section, key, is_path in PATH_KEYS:
            value = getattr(getattr(self, section), key)
            if value and is_path(value):
                # normpath, not resolve(): a symlinked project folder keeps the name the user gave it
                absolute = os.path.normpath(base / Path(value).expanduser())
                if absolute != value:
                    sections.setdefault(section, {})[key] = absolute
        if self.data.sources:
            sources = [dataclasses.replace(source, dir=os.path.normpath(base / Path(source.dir).expanduser()))
                       for source in self.data.sources]
            if sources != self.data.sources:
                sections.setdefault("data", {})["sources"] = sources
        if self.eval.tasks:  # the name stays the file's stem it was given
            tasks = [dataclasses.replace(task, file=os.path.normpath(base / Path(task.file).expanduser()),
                                         name=task.label) for task in self.eval.tasks]
            if tasks != self.eval.tasks:
                sections.setdefault("eval", {})["tasks"] = tasks
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)
                                            for section, changes in sections.items()})

    def training_problems(self) -> list[str]:
        """What only training needs (`rdhpc config` and `rdhpc plan` take a config without data)."""
        if self.data.train_dir is None and not self.data.sources:
            return ["data.train_dir: required for training (a folder made by `rdhpc prep shards`; or data.sources)"]
        return []

    def problems(self) -> list[str]:
        """Every problem of every section, then the ones that involve two sections."""
        out = []
        for name in SECTION_NAMES:
            out += getattr(self, name).problems(prefix=name)
        if (self.schedule.name == "trapezoid"
                and self.schedule.warmup_steps + self.schedule.cooldown_steps > self.train.max_steps):
            out.append(f"schedule.cooldown_steps: warmup_steps + cooldown_steps = "
                       f"{self.schedule.warmup_steps + self.schedule.cooldown_steps} exceeds train.max_steps = "
                       f"{self.train.max_steps}")
        if self.model.hoist_injection and self.zero.stage == 3:
            out.append("model.hoist_injection: not with zero.stage 3 (it reads the adapter's weight without calling "
                       "the adapter, so ZeRO 3 would not gather it)")
        if self.train.compile_scope is not None and self.zero.stage == 3:
            out.append("train.compile: not with zero.stage 3 (its parameter gathering hooks fire inside the compiled "
                       "region); use stage 1 or 2")
        if self.train.precision == "bf16" and self.zero.stage == 0:
            out.append("zero.stage: bf16 needs ZeRO stage >= 1 (DeepSpeed's stage-0 bf16 wrapper takes a hidden "
                       "optimizer step at start, so AdamW's bias correction is off by one)")
        if self.train.bf16_immediate_grad_update and not (self.train.precision == "bf16" and self.zero.stage == 1):
            out.append("train.bf16_immediate_grad_update: applies to precision bf16 with zero.stage 1 only "
                       "(DeepSpeed's bf16 optimizer)")
        return out


SECTION_NAMES = ("model", "data", "optim", "schedule", "train", "eval", "zero", "checkpoint", "logging", "slurm")
# Keys that moved to another section: a config that still sets one is told where it went.
MOVED_KEYS = {"train.val_interval": "eval.interval", "train.val_depths": "eval.depths",
              "train.val_batches": "eval.rows (validation rows over all ranks, not micro-batches per rank)"}
# Moved keys whose new home means something else: a config rdhpc wrote earlier drops them.
CHANGED_MEANING = {"train.val_batches"}


def _always(value) -> bool:
    return True


# (section, key, does this value name a path): the keys RunConfig.with_absolute_paths resolves.
# checkpoint.resume is also 'auto' or 'never'; slurm.cluster is also a preset's name; slurm.python
# is also a command looked up on PATH ("python3").
PATH_KEYS = (
    ("data", "train_dir", _always),
    ("data", "val_dir", _always),
    ("checkpoint", "dir", _always),
    ("checkpoint", "resume", lambda value: value not in ("auto", "never")),
    ("checkpoint", "init_from", _always),
    ("eval", "tokenizer", _always),
    ("logging", "run_dir", _always),
    ("slurm", "cluster", lambda value: "/" in value or value.endswith((".yaml", ".yml"))),
    ("slurm", "python", lambda value: "/" in value),
    ("slurm", "folder", _always),
)
