"""The DeepSpeed trainer of recurrent-depth models, in phases: set up, (resume), train, validate, save.

    rdhpc train configs/debug.yaml --set data.train_dir=shards/          # one process
    rdhpc launch local configs/debug.yaml --nproc 2 --set ...            # N local ranks (gloo on CPU)

Every rank draws the same depth per optimizer step from (train.seed, step); the first n iterations
run without gradient, the last k with it. Checkpoints are DeepSpeed checkpoints plus the loader
position, the RNG state of every rank and the config; the `latest` pointer moves only after every
rank finished writing, so a run killed at any moment resumes from the last complete one. A run
resumed on another number of ranks goes through DeepSpeed's universal checkpoint.

Stopping early on purpose: SIGUSR1, SIGUSR2 or SIGTERM to any rank (Slurm's warning signal before the time
limit or a preemption), or the time budget RDHPC_STOP_AT (unix seconds), make every rank save a
checkpoint at the next step boundary and return; `RUN_DIR/run_state.json` then says "stopped", and a
requeued job continues from there.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rdhpc.config import ConfigError, RunConfig, save_config
from rdhpc.data.loader import BatchLoader, ShardDataset, inputs_and_labels
from rdhpc.distributed import RankInfo
from rdhpc.errors import UserError
from rdhpc.model import DepthSampler, RecurrentDepthModel
from rdhpc.train.heartbeat import Heartbeat, diagnose
from rdhpc.train.metrics import flops_per_token, peak_tflops
from rdhpc.train.engine import attention_kernels, build_engine, quiet_deepspeed_deprecations, skip_deepspeed_shm_op
from rdhpc.train.optim import LRSchedule

LATEST = "latest"
STATE_DIR = "rdhpc"
# Fault injection for tests and drills: "3,4" makes rank 0's loss NaN at optimizer steps 3 and 4.
FAULT_NAN_STEPS = "RDHPC_FAULT_NAN_STEPS"
# `touch RUN_DIR/COOLDOWN` asks a trapezoid schedule to start its cool-down at the next step.
COOLDOWN_REQUEST = "COOLDOWN"
# Unix time at which the run saves a checkpoint and stops (the job's end minus a margin).
STOP_AT = "RDHPC_STOP_AT"
# SIGTERM too: Slurm sends it at preemption (then SIGKILL after the partition's GraceTime) and at
# `scancel`; within the grace the ranks save at the next step boundary. A rank blocked in a
# collective never gets there and is killed as before: the `latest` pointer keeps the last complete
# checkpoint either way.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
TERMINATED = "signal SIGTERM"
RUN_STATE = "run_state.json"
UNIVERSAL_SUFFIX = "_universal"
_TAG_PATTERN = "step[0-9]*"


class TrainingError(UserError, RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); every rank raises it."""


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    """Mean loss of each step this process ran (not the steps before a resume)."""
    step: int = 0
    completed: bool = False
    """True when train.max_steps was reached or the data ran out; False when stopped on request."""
    stop_reason: str | None = None
    terminated: bool = False
    """Some rank received SIGTERM (Slurm is ending the job: scancel, the hard limit, a preemption):
    agreed by all ranks with the stop, so that no rank requeues a job Slurm is taking back."""


@dataclass
class ResumePoint:
    folder: Path
    tag: str
    state: dict
    load_tag: str  # tag handed to DeepSpeed: `tag`, or its universal conversion

    @property
    def path(self) -> Path:
        return self.folder / self.tag

    @property
    def universal(self) -> bool:
        return self.load_tag != self.tag


class Trainer:
    def __init__(self, run: RunConfig, ranks: RankInfo, log=print):
        self.run, self.ranks = run, ranks
        self.log = log if ranks.is_main else (lambda *a, **k: None)
        self.run_dir = Path(run.logging.run_dir)
        self.checkpoint_dir = Path(run.checkpoint.dir or self.run_dir / "checkpoints")
        self.step = 0
        self.writer = None
        self.cooldown_start = None  # the step a "cool down now" request fixed (kept in checkpoints)
        self.skipped_steps = 0  # steps with a non-finite loss or gradient, not applied
        self.consecutive_skips = 0
        self.nan_steps = {int(s) for s in os.environ.get(FAULT_NAN_STEPS, "").split(",") if s.strip()}
        self.stop_reason = None  # set by a signal handler or the time budget; acted on at a step boundary
        self.terminated = False  # some rank got SIGTERM, as agreed at the last step boundary
        self.stop_at = float(os.environ[STOP_AT]) if os.environ.get(STOP_AT) else None
        self._previous_handlers = {}
        self.heartbeat = Heartbeat(self.run_dir / "heartbeat", ranks.rank, ranks.world_size,
                                   run.train.heartbeat_interval_s, run.train.stall_timeout_s)

    # ---- set-up -------------------------------------------------------------------------------
    def setup(self):
        run = self.run
        if run.data.train_dir is None:
            raise ConfigError(["data.train_dir: required for training (a folder made by `rdhpc prep shards`)"])
        if run.train.precision == "bf16" and run.zero.stage == 0:
            raise ConfigError(["zero.stage: bf16 needs ZeRO stage >= 1 (DeepSpeed's stage-0 bf16 wrapper takes a "
                               "hidden optimizer step at start, so AdamW's bias correction is off by one)"])
        use_cuda = run.train.device == "cuda" or (run.train.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda", self.ranks.local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        else:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            skip_deepspeed_shm_op()
        quiet_deepspeed_deprecations()
        self._install_stop_handlers()  # first: a warning signal during set-up is a stop request too
        self.heartbeat.start()
        self.heartbeat.progress(0, "init process group")
        self._init_distributed(backend="nccl" if use_cuda else "gloo")

        if run.train.preflight:
            from rdhpc.distributed.preflight import run_preflight

            self.heartbeat.progress(0, "pre-flight")
            self.preflight = run_preflight(self.device, self.ranks, log=self.log)  # touches no RNG stream

        self.heartbeat.progress(0, "open shards")
        self.dataset = ShardDataset(run.data.train_dir, "train", seq_len=run.model.max_seq_len,
                                    verify_checksums=run.data.verify_checksums)
        vocab = self.dataset.manifest.tokenizer.vocab_size
        if vocab > run.model.padded_vocab_size:
            raise ConfigError([f"model.vocab_size: the shards' tokenizer has {vocab} tokens, the model "
                               f"embeds {run.model.padded_vocab_size}"])
        self.val_dataset = ShardDataset(run.data.val_dir or run.data.train_dir, "val", seq_len=run.model.max_seq_len,
                                        verify_checksums=run.data.verify_checksums)
        self.loader = BatchLoader(self.dataset, run.train.global_batch_size, run.train.micro_batch_size,
                                  self.ranks.rank, self.ranks.world_size, seed=run.data.shuffle_seed,
                                  on_exhausted=run.data.on_exhausted, prefetch_steps=run.data.prefetch_batches)

        torch.manual_seed(run.train.seed)  # the same initial weights on every rank
        model = RecurrentDepthModel(run.model)
        self.heartbeat.progress(0, "resume point")
        self.resume_point = self._find_resume_point()
        if run.checkpoint.init_from and self.resume_point is None:
            # continued pretraining: start from other weights (e.g. the released model); a resumed
            # run takes its own checkpoint instead
            from rdhpc.export import load_initial_weights

            load_initial_weights(model, run.checkpoint.init_from, log=self.log)
        self.heartbeat.progress(0, "initialize engine")
        self.engine, self.optimizer, self.ds_config = build_engine(
            run, model, self.ranks.world_size, self.device,
            load_universal=self.resume_point is not None and self.resume_point.universal)
        self.attention_kernels = lambda: attention_kernels(run.train.sdpa_backend)
        self.sampler = DepthSampler.from_model_config(run.model, seed=run.train.seed)
        self.schedule = LRSchedule(run.schedule, run.optim.lr, run.train.max_steps)
        torch.manual_seed(run.train.seed + 1000 * self.ranks.rank)  # initial-state noise differs per rank
        if self.ranks.is_main:
            save_config(run, self.run_dir)
            (self.run_dir / "deepspeed.json").write_text(json.dumps(self.ds_config, indent=2))
            if run.logging.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        self.peak_tflops, peak_source = peak_tflops(self.device, torch.bfloat16 if run.train.precision == "bf16"
                                                    else torch.float32, run.train.peak_tflops_per_device)
        counts = model.parameter_counts()
        self.log(f"[train] MFU against {self.peak_tflops:.3g} TFLOP/s per device ({peak_source})")
        self.log(f"[train] {counts['total']:,} parameters on {self.ranks.world_size} rank(s) ({self.device.type}), "
                 f"ZeRO {run.zero.stage}, {run.train.precision}, global batch {run.train.global_batch_size} x "
                 f"{run.model.max_seq_len} tokens, {self.ds_config['gradient_accumulation_steps']} micro-step(s) per step")
        tc, mc = run.train, run.model
        self.log(f"[train] compile: {tc.compile_scope or 'off'}"
                 f"{f' ({tc.compile_backend})' if tc.compile_scope else ''}, attention kernels: {tc.sdpa_backend}, "
                 f"loss: {f'chunks of {mc.loss_chunk_size} tokens' if mc.loss_chunk_size else 'whole logits'}, "
                 f"iterations without gradient: {mc.no_grad_mode}, activation checkpointing: "
                 f"{'on' if mc.activation_checkpointing else 'off'}")
        if tc.compile_scope == "model" and mc.sampling_scheme != "fixed":
            self.log("[train] warning: train.compile 'model' compiles a new graph for every new sampled depth "
                     "(and falls back to eager after a few); 'core' compiles one graph for all depths")

    def _init_distributed(self, backend: str):
        import deepspeed
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=self.run.train.collective_timeout_s)
        # ZeRO clones the world group with torch's default timeout (30 min): bound that one too.
        dist.distributed_c10d.default_pg_timeout = timeout
        from rdhpc.distributed.ranks import export_process_group_env

        # an explicit MASTER_ADDR/PORT is kept; under Slurm the allocation's first node, under MPI
        # rank 0's address (broadcast), else loopback: never an external address picked by accident
        export_process_group_env(self.ranks)
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout, auto_mpi_discovery=False)

    def _install_stop_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. not in a test thread)

        def request_stop(signum, frame):
            self.stop_reason = f"signal {signal.Signals(signum).name}"

        for sig in STOP_SIGNALS:  # replaces e.g. submitit's own handler: the trainer saves, the job requeues
            self._previous_handlers[sig] = signal.signal(sig, request_stop)

    # ---- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self):
        import torch.distributed as dist

        tag = f"step{self.step:08d}"
        self.heartbeat.progress(self.step, "save checkpoint")
        self.engine.save_checkpoint(str(self.checkpoint_dir), tag=tag, save_latest=False)
        state_dir = self.checkpoint_dir / tag / STATE_DIR
        state_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                   state_dir / f"rng_rank{self.ranks.rank}.pt")
        if self.ranks.is_main:
            (state_dir / "trainer_state.json").write_text(json.dumps(
                {"step": self.step, "loader": self.loader.state_dict(), "world_size": self.ranks.world_size,
                 "skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips,
                 "cooldown_start": self.cooldown_start}))
            save_config(self.run, state_dir)
            (state_dir / "deepspeed.json").write_text(json.dumps(self.ds_config, indent=2))
        dist.barrier()  # every rank finished writing: only now may the pointer move
        if self.ranks.is_main:
            pointer = self.checkpoint_dir / LATEST
            tmp = pointer.with_name(LATEST + ".tmp")
            tmp.write_text(tag)
            os.replace(tmp, pointer)
            tags = sorted(p.name for p in self.checkpoint_dir.glob(_TAG_PATTERN)
                          if p.is_dir() and not p.name.endswith(UNIVERSAL_SUFFIX))
            for old in tags[:-self.run.checkpoint.keep_last]:
                shutil.rmtree(self.checkpoint_dir / old, ignore_errors=True)
                shutil.rmtree(self.checkpoint_dir / (old + UNIVERSAL_SUFFIX), ignore_errors=True)
        dist.barrier()
        self.log(f"[train] saved checkpoint {self.checkpoint_dir / tag}")

    def _find_resume_point(self) -> ResumePoint | None:
        """The checkpoint to resume from (checkpoint.resume), decided before the engine is built:
        a checkpoint of another number of ranks must be converted to DeepSpeed's universal format,
        and the engine must be told so in its config."""
        resume = self.run.checkpoint.resume
        if resume == "never":
            return None
        if resume == "auto":
            folder = self.checkpoint_dir
            if not (folder / LATEST).exists():
                return None
            tag = (folder / LATEST).read_text().strip()
        else:
            folder, tag = Path(resume).parent, Path(resume).name
        state_file = folder / tag / STATE_DIR / "trainer_state.json"
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError([f"checkpoint.resume: {folder / tag} is not a complete rdhpc checkpoint "
                               f"({state_file}: {exc})"]) from None
        point = ResumePoint(folder, tag, state, load_tag=tag)
        if state["world_size"] != self.ranks.world_size and self.run.zero.stage > 0:
            # ZeRO partitions optimizer state (and at stage 3 the weights) by rank: another world
            # size needs the universal format. Stage 0 keeps whole copies and loads as it is.
            point.load_tag = tag + UNIVERSAL_SUFFIX
            self._convert_to_universal(point)
        return point

    def _convert_to_universal(self, point: ResumePoint):
        target = point.folder / point.load_tag
        done_marker = target / STATE_DIR / "converted.json"
        error = None  # rank 0's, when the conversion fails
        if self.ranks.is_main and not done_marker.exists():
            self.log(f"[train] {point.path} was written by {point.state['world_size']} ranks, this run has "
                     f"{self.ranks.world_size}: converting it to a universal checkpoint in {target}")
            shutil.rmtree(target, ignore_errors=True)
            command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                       str(point.path), "--output_folder", str(target), "--num_extract_workers", "2",
                       "--num_merge_workers", "2"]
            if self.run.zero.stage in (1, 2):
                command.append("--inject_missing_state")  # stages 1 and 2 lack what the loader looks for
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                error = f"{' '.join(command)} failed:\n{done.stderr[-3000:]}"
            else:
                done_marker.parent.mkdir(parents=True, exist_ok=True)
                done_marker.write_text(json.dumps({"source": point.tag, "seconds": time.perf_counter() - started}))
        failed, = self._any_rank(error is not None)
        if failed:
            raise TrainingError(f"rank {self.ranks.rank}: converting {point.path} to a universal checkpoint failed"
                                + (f": {error}" if error else " on rank 0"))

    def maybe_resume(self):
        point = self.resume_point
        if point is None:
            return
        self.heartbeat.progress(0, "load checkpoint")
        self.engine.load_checkpoint(str(point.folder), tag=point.load_tag)
        state = point.state
        self.step = state["step"]
        self.skipped_steps, self.consecutive_skips = state["skipped_steps"], state["consecutive_skips"]
        self.cooldown_start = state["cooldown_start"]
        self.loader.load_state_dict(state["loader"])  # consumed global batches: the order is rank-independent
        rng_file = point.path / STATE_DIR / f"rng_rank{self.ranks.rank}.pt"
        if rng_file.exists():
            rng = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        else:  # a rank the checkpoint did not have: a fresh stream, still a function of (seed, rank, step)
            torch.manual_seed(self.run.train.seed + 1000 * self.ranks.rank + 7919 * self.step)
        changed = "" if state["world_size"] == self.ranks.world_size else \
            f" (written by {state['world_size']} ranks, now {self.ranks.world_size})"
        self.log(f"[train] resumed from {point.path} at step {self.step}{changed}")

    # ---- training -----------------------------------------------------------------------------
    def _mean_over_ranks(self, values: list[float]) -> list[float]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.ranks.world_size).tolist()

    def _any_rank(self, *flags: bool) -> list[bool]:
        """Each flag true on every rank if it is true on one: ranks may see a new file or a signal at
        different steps, yet they must act at the same step."""
        import torch.distributed as dist

        t = torch.tensor([1.0 if f else 0.0 for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def _stop_requested_here(self) -> bool:
        if self.stop_reason is None and self.stop_at is not None and time.time() >= self.stop_at:
            self.stop_reason = f"time budget ({STOP_AT}={self.stop_at:.0f})"
        return self.stop_reason is not None

    def _handle_requests(self) -> bool:
        """Cool-down and stop requests, agreed by all ranks; True when the run must stop now."""
        self.heartbeat.progress(self.step, "requests")
        here = self._stop_requested_here()
        cooldown, stop, terminated, budget = self._any_rank(
            (self.run_dir / COOLDOWN_REQUEST).exists(), here, self.stop_reason == TERMINATED,
            here and self.stop_reason.startswith("time budget"))
        self.terminated |= terminated
        if stop and not here:  # say why all the same: the ranks' clocks and signals differ by moments
            self.stop_reason = (f"time budget ({STOP_AT}, reached first on another rank)" if budget else
                                f"{TERMINATED} to another rank" if terminated else None)
        if cooldown and self.cooldown_start is None:
            self.cooldown_start = self.step
            self.log(f"[train] cool-down requested: the learning rate decays from step {self.step}")
        return stop

    def train(self) -> TrainResult:
        run, tc = self.run, self.run.train
        result = TrainResult()
        losses = result.losses
        tokens_per_step = tc.global_batch_size * run.model.max_seq_len
        window_start, window_tokens, window_flops = time.perf_counter(), 0, 0.0
        last_saved = self.step if self.resume_point else None
        # Requests are handled between steps, never with a batch taken from the loader and not
        # trained on: the checkpoint's loader position must be exactly the steps done.
        stop = self._handle_requests()
        for step_batches in ([] if stop else self.loader):
            if self.step >= tc.max_steps:
                break
            lr = self.schedule(self.step, self.cooldown_start)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            n_no_grad, n_grad = self.sampler(self.step)
            self.heartbeat.progress(self.step + 1, "forward/backward")
            micro_losses = []
            skipped_before = self.engine.skipped_steps
            for inputs, labels in step_batches:
                with self.attention_kernels():
                    out = self.engine(inputs.to(self.device), num_steps=(n_no_grad, n_grad),
                                      labels=labels.to(self.device), return_logits=False)
                loss_for_backward = out.loss
                if self.step + 1 in self.nan_steps and self.ranks.is_main:
                    loss_for_backward = out.loss * float("nan")
                self.engine.backward(loss_for_backward)
                # ZeRO's optimizers check the reduced gradients for inf/NaN on every rank alike and
                # skip the update (clearing the gradients); the engine counts it.
                self.engine.step()
                micro_losses.append(loss_for_backward.item())
            with torch.no_grad():  # the paper's convergence diagnostics of the latent state
                state, previous = out.latent_state.float(), out.previous_state.float()
                rel_change = ((state - previous).norm() / state.norm().clamp_min(1e-12)).item()
                state_norm = state.norm(dim=-1).mean().item()
            self.step += 1
            self.heartbeat.progress(self.step, "metrics all-reduce")
            loss, rel_change, state_norm = self._mean_over_ranks(
                [sum(micro_losses) / len(micro_losses), rel_change, state_norm])
            self.state_diagnostics = {"state/rel_change": rel_change, "state/norm": state_norm}
            skipped = self.engine.skipped_steps > skipped_before or not math.isfinite(loss)
            self.skipped_steps += skipped
            self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
            if skipped:
                self.log(f"[train] step {self.step}: non-finite loss or gradient, update skipped "
                         f"({self.consecutive_skips} in a row, {self.skipped_steps} in all)")
                if self.writer is not None:
                    self.writer.add_scalar("train/skipped_steps", self.skipped_steps, self.step)
            if self.consecutive_skips >= tc.max_consecutive_skips:
                raise TrainingError(f"rank {self.ranks.rank}: {self.consecutive_skips} consecutive steps with a "
                                    f"non-finite loss or gradient (train.max_consecutive_skips = "
                                    f"{tc.max_consecutive_skips}); stopping at step {self.step}")
            losses.append(loss)
            if self.ranks.is_main:  # one line per step: what tests and reports read back
                with open(self.run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"step": self.step, "loss": loss, "lr": lr, "recurrence": [n_no_grad, n_grad],
                                        "time": round(time.time(), 4)}) + "\n")
            window_tokens += tokens_per_step
            window_flops += tokens_per_step * flops_per_token(run.model, run.model.max_seq_len, n_no_grad, n_grad)
            if self.step % tc.log_interval == 0 or self.step == tc.max_steps:
                elapsed = time.perf_counter() - window_start
                self._log_step(loss, lr, n_no_grad + n_grad, window_tokens / elapsed,
                               window_flops / elapsed / self.ranks.world_size)
                window_start, window_tokens, window_flops = time.perf_counter(), 0, 0.0
            if self.step % tc.val_interval == 0 or self.step == tc.max_steps:
                self.validate()
            if self.step % run.checkpoint.interval == 0 or self.step == tc.max_steps:
                self.save_checkpoint()
                last_saved = self.step
            if self.step < tc.max_steps and self._handle_requests():
                stop = True
                break
        if stop:
            result.stop_reason = self.stop_reason or "another rank's stop request (SIGUSR1 or SIGUSR2)"
            self.log(f"[train] stopping after step {self.step}: {result.stop_reason}")
            if last_saved != self.step:
                self.save_checkpoint()
            result.step = self.step
            # a SIGTERM here after the ranks agreed on another stop (during the save) counts too
            result.terminated = self.terminated or self.stop_reason == TERMINATED
            return result
        if self.step < tc.max_steps and losses and last_saved != self.step:
            self.log(f"[train] the training data ran out at step {self.step} (data.on_exhausted = stop)")
            self.validate()
            self.save_checkpoint()
        result.step, result.completed = self.step, True
        return result

    def _log_step(self, loss, lr, depth, tokens_per_s, flops_per_s_per_device):
        tflops = flops_per_s_per_device / 1e12
        mfu = tflops / self.peak_tflops
        grad_norm = self.engine.get_global_grad_norm()
        mem = torch.cuda.max_memory_allocated() / 2 ** 30 if self.device.type == "cuda" else 0.0
        self.log(f"[train] step {self.step:6d}  loss {loss:.4f}  r={depth:3d}  lr {lr:.2e}  "
                 f"{tokens_per_s:,.0f} tok/s  {tflops:.3f} TFLOP/s/device  MFU {100 * mfu:.2f}%")
        if self.writer is not None:
            scalars = {"train/loss": loss, "train/lr": lr, "train/recurrence": depth, "train/tokens_per_s": tokens_per_s,
                       "train/tflops_per_gpu": tflops, "train/mfu": mfu, "train/mem_gib": mem}
            if grad_norm is not None:
                scalars["train/grad_norm"] = float(grad_norm)
            scalars.update(self.state_diagnostics)
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, self.step)
            self.writer.flush()

    @torch.no_grad()
    def validate(self) -> dict[int, float]:
        tc = self.run.train
        self.heartbeat.progress(self.step, "validation")
        self.engine.eval()
        rows_per_rank = tc.val_batches * tc.micro_batch_size
        total = len(self.val_dataset)
        indices = (np.arange(rows_per_rank) + self.ranks.rank * rows_per_rank) % total
        rows = self.val_dataset.rows(indices)
        results = {}
        with torch.random.fork_rng(devices=[]):
            for depth in tc.val_depths:
                torch.manual_seed(tc.seed)  # the same initial-state noise at every validation
                losses = []
                for start in range(0, rows_per_rank, tc.micro_batch_size):
                    inputs, labels = inputs_and_labels(rows[start:start + tc.micro_batch_size], self.val_dataset.pad_id)
                    with self.attention_kernels():
                        out = self.engine(inputs.to(self.device), num_steps=depth, labels=labels.to(self.device),
                                          return_logits=False)
                    losses.append(out.loss.item())
                results[depth] = sum(losses) / len(losses)
        means = self._mean_over_ranks([results[d] for d in tc.val_depths])
        results = dict(zip(tc.val_depths, means))
        self.engine.train()
        self.log("[train] validation " + "  ".join(f"r={d}: {v:.4f}" for d, v in results.items()))
        if self.writer is not None:
            for depth, value in results.items():
                self.writer.add_scalar(f"val/loss_r{depth}", value, self.step)
            self.writer.flush()
        return results

    def write_run_state(self, state: str, **details):
        """RUN_DIR/run_state.json: how the run ended (read by `rdhpc status` and the Slurm job)."""
        if not self.ranks.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / (RUN_STATE + ".tmp")
        tmp.write_text(json.dumps({"state": state, "step": self.step, "time": time.time(), **details}))
        os.replace(tmp, self.run_dir / RUN_STATE)

    def close(self, failed: bool = False):
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        if self.writer is not None:
            self.writer.close()
        self._destroy_process_group(failed)

    @staticmethod
    def _destroy_process_group(failed: bool):
        """Tear the process group down before the interpreter exits. Left to the exit handlers,
        gloo's threads can be destroyed while still joinable when the peer exits at the same time,
        and the rank dies by SIGABRT ("terminate called without an active exception") instead of
        exiting with its status: 2 of 30 runs where both ranks refuse a corrupted shard, 0 of 110
        with this. gloo's teardown is local, so it is safe after a failure too. NCCL's is not:
        destroying a communicator while other ranks still wait in a collective can hang this rank
        (torchtitan destroys only after success for that reason), so a failed NCCL rank leaves it
        to the exit, as before."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        if failed and dist.get_backend() != "gloo":
            return
        dist.destroy_process_group()


def train(run: RunConfig, ranks: RankInfo, log=print) -> TrainResult:
    """The whole job: set up, resume if there is a checkpoint, train, always tear down.

    When a rank fails (its own error or a collective broken by another rank), the error it raises
    names the ranks at fault as their heartbeats tell: a dead or frozen rank stops beating."""
    trainer = Trainer(run, ranks, log)
    failed = True
    try:
        trainer.setup()
        trainer.maybe_resume()
        result = trainer.train()
        failed = False
    except UserError as exc:
        trainer.heartbeat.stop(f"failed: {exc}"[:500])
        trainer.write_run_state("failed", error=str(exc)[:2000])
        raise
    except Exception as exc:
        trainer.heartbeat.stop(f"failed: {type(exc).__name__}: {exc}"[:500])
        # Give the others one beat to record their own failure, so the silent ones stand out.
        time.sleep(1.5 * run.train.heartbeat_interval_s)
        report = diagnose(trainer.heartbeat.folder, ranks.world_size, run.train.heartbeat_interval_s,
                          self_rank=ranks.rank)
        message = (f"rank {ranks.rank} failed at step {trainer.step}: {type(exc).__name__}: "
                   f"{str(exc).splitlines()[0] if str(exc) else ''}. {report}")
        trainer.write_run_state("failed", error=message)
        raise TrainingError(message) from exc
    finally:
        trainer.close(failed=failed)
    trainer.heartbeat.stop("done")
    if result.completed:
        trainer.write_run_state("completed")
    else:
        trainer.write_run_state("stopped", reason=result.stop_reason, terminated=result.terminated)
    return result
