"""The DeepSpeed trainer of recurrent-depth models, in phases: set up, (resume), train, evaluate, save.

    rdhpc train configs/debug.yaml --set data.train_dir=shards/          # one process
    rdhpc launch local configs/debug.yaml --nproc 2 --set ...            # N local ranks (gloo on CPU)

Every rank draws the same depth per optimizer step from (train.seed, step); the first n iterations
run without gradient, the last k with it. The trainer only calls its components: the loader
(rdhpc.data.loader), the checkpointer (rdhpc.train.checkpoint: tags, `latest`, retention, resume,
universal conversion), the evaluators (rdhpc.eval.in_loop) and the metrics sink
(rdhpc.train.metrics.MetricsSink).

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
import signal
import threading
import time
from dataclasses import dataclass, field

import torch

from rdhpc.config import RunConfig, config_to_yaml, save_config
from rdhpc.data.loader import BatchLoader, verify_shards
from rdhpc.data.mixture import open_training_data
from rdhpc.distributed import RankInfo
from rdhpc.distributed.ranks import local_device_index
from rdhpc.distributed.collectives import any_rank, gather_lists, is_collective_failure, mean_over_ranks, sum_over_ranks
from rdhpc.errors import ConfigError, UserError
from rdhpc.eval.in_loop import build_evaluators
from rdhpc.model import DepthSampler, RecurrentDepthModel
from rdhpc.model.sampling import row_noise_seeds
from rdhpc.run_folder import STOP_AT_VARIABLE, RunFolder, RunLock, RunLockError
from rdhpc.train.checkpoint import DEEPSPEED_CONFIG, RUN_CONFIG, Checkpointer
from rdhpc.train.engine import attention_kernels, build_engine, quiet_deepspeed_deprecations, skip_deepspeed_shm_op
from rdhpc.train.heartbeat import Heartbeat, diagnose, find_suspects
from rdhpc.train.metrics import MetricsSink, RunLog, flops_per_token, peak_tflops
from rdhpc.train.optim import LRSchedule

# Fault injection for tests and drills: "3,4" makes rank 0's loss NaN at optimizer steps 3 and 4.
FAULT_NAN_STEPS = "RDHPC_FAULT_NAN_STEPS"
# SIGTERM too: Slurm sends it at preemption (then SIGKILL after the partition's GraceTime) and at
# `scancel`; within the grace the ranks save at the next step boundary. A rank blocked in a
# collective never gets there and is killed as before: the `latest` pointer keeps the last complete
# checkpoint either way.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
TERMINATED = "signal SIGTERM"


class TrainingError(UserError, RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); every rank raises it."""


class PeerFailure(TrainingError):
    """A collective broke under this rank: a peer died, froze or timed out. `suspects` is what the
    heartbeats say (rdhpc.train.heartbeat.Suspects): the job decides from it whether the failure
    was the machines' (requeue) or a rank's own error (no requeue)."""

    def __init__(self, message: str, suspects):
        super().__init__(message)
        self.suspects = suspects


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


class Trainer:
    def __init__(self, run: RunConfig, ranks: RankInfo, log=print):
        problems = run.training_problems()
        if problems:
            raise ConfigError(problems)
        # paths as the user gave them, relative to this folder; everything the run saves names them absolutely
        run = run.with_absolute_paths()
        self.run, self.ranks = run, ranks
        self.log = RunLog(log if ranks.is_main else None)
        self.folder = RunFolder(run.logging.run_dir)
        self.step = 0
        self.start_step = 0  # the step this segment started from (its resume point)
        self.sink = None
        self.cooldown_start = None  # the step a "cool down now" request fixed (kept in checkpoints)
        self.skipped_steps = 0  # steps with a non-finite loss or gradient, not applied
        self.consecutive_skips = 0
        self.nan_steps = {int(s) for s in os.environ.get(FAULT_NAN_STEPS, "").split(",") if s.strip()}
        self.stop_reason = None  # set by a signal handler or the time budget; acted on at a step boundary
        self.terminated = False  # some rank got SIGTERM, as agreed at the last step boundary
        stop_at = os.environ.get(STOP_AT_VARIABLE)
        self.stop_at = float(stop_at) if stop_at else None
        self._previous_handlers = {}
        self.heartbeat = Heartbeat(self.folder.heartbeats, ranks.rank, ranks.world_size,
                                   run.train.heartbeat_interval_s, run.train.stall_timeout_s)
        self.lock = RunLock(self.folder)  # rank 0 holds the run folder while the run goes on

    # ---- set-up -------------------------------------------------------------------------------
    def setup(self):
        run = self.run
        use_cuda = run.train.device == "cuda" or (run.train.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda", local_device_index(self.ranks.local_rank, torch.cuda.device_count())) \
            if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        else:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            skip_deepspeed_shm_op()
        quiet_deepspeed_deprecations()
        self._install_stop_handlers()  # first: a warning signal during set-up is a stop request too
        # Nothing is written into the run folder before rank 0 owns it: a second trainer started
        # on a running run stops here, on every rank, having touched none of its files.
        lock_error = None
        if self.ranks.is_main:
            try:
                self.lock.acquire(log=self.log)
                self.log.open(self.folder.train_log)
            except RunLockError as exc:
                lock_error = exc
        self._init_distributed(backend="nccl" if use_cuda else "gloo")
        if any_rank([lock_error is not None], self.device)[0]:
            raise lock_error or RunLockError(f"rank {self.ranks.rank}: rank 0 could not take the run folder's lock "
                                             f"({self.folder.lock}): another trainer holds it")
        self.heartbeat.start()

        matmul_dtype = torch.float32 if run.train.precision == "fp32" else torch.bfloat16
        self.preflight = None
        if run.train.preflight:
            from rdhpc.distributed.preflight import run_preflight

            self.heartbeat.progress(0, "pre-flight")
            # touches no RNG stream; its GEMM runs in the training's matrix-product dtype
            self.preflight = run_preflight(self.device, self.ranks, log=self.log, dtype=matmul_dtype)

        self.heartbeat.progress(0, "open shards")  # manifests only: a shard is opened when first read
        data = open_training_data(run.data, run.model.max_seq_len, run.model.padded_vocab_size)
        self.dataset, self.val_datasets = data.train, data.val  # one source, or a mixture of data.sources
        for note in data.notes:
            self.log(note)
        self.heartbeat.progress(0, "verify shards")
        verify_shards(data.verify, run.data.verify_mode, self.folder.shards_verified,
                      self.ranks.rank, self.ranks.world_size, gather_lists, log=self.log)
        self.loader = BatchLoader(self.dataset, run.train.global_batch_size, run.train.micro_batch_size,
                                  self.ranks.rank, self.ranks.world_size, seed=run.data.shuffle_seed,
                                  on_exhausted=run.data.on_exhausted, prefetch_steps=run.data.prefetch_batches,
                                  log=self.log)

        torch.manual_seed(run.train.seed)  # the same initial weights on every rank
        model = RecurrentDepthModel(run.model)
        counts = model.parameter_counts()  # before ZeRO 3 partitions the weights
        self.heartbeat.progress(0, "resume point")
        self.checkpointer = Checkpointer(run.checkpoint.dir or self.folder.checkpoints, self.ranks.rank,
                                         self.ranks.world_size, run.checkpoint.keep_last,
                                         any_rank=lambda flags: any_rank(flags, self.device), log=self.log)
        self.resume_point = self.checkpointer.find_resume_point(run.checkpoint.resume, run.zero.stage)
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
        self.evaluators = build_evaluators(run, self.val_datasets, self.dataset.pad_id, self.ranks.rank,
                                           self.ranks.world_size, self.device,
                                           lambda values: sum_over_ranks(values, self.device))
        # the step draws its noise from per-row generators (row_noise_seeds); the global stream is
        # seeded per rank for anything else that might draw from it
        torch.manual_seed(run.train.seed + 1000 * self.ranks.rank)
        self.sink = MetricsSink(self.folder, self.ranks.is_main, run.logging.tensorboard, log=self.log)
        self.peak_tflops, peak_source = peak_tflops(self.device, matmul_dtype, run.train.peak_tflops_per_device,
                                                    self.preflight)
        self._log_setup(counts, peak_source)

    def _log_setup(self, counts: dict, peak_source: str):
        run, tc, mc = self.run, self.run.train, self.run.model
        self.log(f"[train] MFU against {self.peak_tflops:.4g} TFLOP/s per device ({peak_source})")
        self.log(f"[train] {counts['total']:,} parameters on {self.ranks.world_size} rank(s) ({self.device.type}), "
                 f"ZeRO {run.zero.stage}, {tc.precision}, global batch {tc.global_batch_size} x "
                 f"{mc.max_seq_len} tokens, {self.ds_config['gradient_accumulation_steps']} micro-step(s) per step")
        compiled = f"{tc.compile_scope} ({tc.compile_backend})" if tc.compile_scope else "off"
        loss = f"chunks of {mc.loss_chunk_size} tokens" if mc.loss_chunk_size else "whole logits"
        recompute = "on" if mc.activation_checkpointing else "off"
        self.log(f"[train] compile: {compiled}, attention kernels: {tc.sdpa_backend}, loss: {loss}, iterations "
                 f"without gradient: {mc.no_grad_mode}, activation checkpointing: {recompute}")
        if tc.compile_scope == "model" and mc.sampling_scheme != "fixed":
            self.log("[train] warning: train.compile 'model' compiles a new graph for every new sampled depth "
                     "(and falls back to eager after a few); 'core' compiles one graph for all depths")

    def _init_distributed(self, backend: str):
        import deepspeed
        import torch.distributed as dist

        from rdhpc.distributed.ranks import export_process_group_env

        timeout = datetime.timedelta(seconds=self.run.train.collective_timeout_s)
        # ZeRO clones the world group with torch's default timeout (30 min): bound that one too.
        dist.distributed_c10d.default_pg_timeout = timeout
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
        self.heartbeat.progress(self.step, "save checkpoint")
        state = {"loader": self.loader.state_dict(), "skipped_steps": self.skipped_steps,
                 "consecutive_skips": self.consecutive_skips, "cooldown_start": self.cooldown_start}
        self.checkpointer.save(self.engine, self.step, state, {RUN_CONFIG: config_to_yaml(self.run),
                                                               DEEPSPEED_CONFIG: json.dumps(self.ds_config, indent=2)})

    def maybe_resume(self):
        """Load the resume point, if any; then record the run's config and DeepSpeed JSON (after the
        resume: a resume that fails leaves the run folder's files as they were)."""
        if self.resume_point is not None:
            self._resume(self.resume_point)
        if self.ranks.is_main:
            save_config(self.run, self.folder.root)
            self.folder.deepspeed_config.write_text(json.dumps(self.ds_config, indent=2))

    def _resume(self, point):
        self.heartbeat.progress(0, "load checkpoint")
        step = point.state["step"]
        # a rank the checkpoint did not have: a fresh stream, still a function of (seed, rank, step)
        reseed = lambda: torch.manual_seed(self.run.train.seed + 1000 * self.ranks.rank + 7919 * step)  # noqa: E731
        state = self.checkpointer.load(self.engine, point, reseed)
        self.step = self.start_step = state["step"]
        self.skipped_steps, self.consecutive_skips = state["skipped_steps"], state["consecutive_skips"]
        self.cooldown_start = state["cooldown_start"]
        self.loader.load_state_dict(state["loader"])  # consumed global batches: the order is rank-independent

    # ---- training -----------------------------------------------------------------------------
    def _stop_requested_here(self) -> bool:
        if self.stop_reason is None and self.stop_at is not None and time.time() >= self.stop_at:
            self.stop_reason = f"time budget ({STOP_AT_VARIABLE}={self.stop_at:.0f})"
        return self.stop_reason is not None

    def _handle_requests(self) -> bool:
        """Cool-down and stop requests, agreed by all ranks (ranks may see a new file or a signal at
        different steps, yet they must act at the same step); True when the run must stop now."""
        self.heartbeat.progress(self.step, "requests")
        here = self._stop_requested_here()
        cooldown, stop, terminated, budget = any_rank(
            [self.folder.cooldown_request.exists(), here, self.stop_reason == TERMINATED,
             here and self.stop_reason.startswith("time budget")], self.device)
        self.terminated |= terminated
        if stop and not here:  # say why all the same: the ranks' clocks and signals differ by moments
            self.stop_reason = (f"time budget ({STOP_AT_VARIABLE}, reached first on another rank)" if budget else
                                f"{TERMINATED} to another rank" if terminated else None)
        if cooldown and self.cooldown_start is None:
            self.cooldown_start = self.step
            self.log(f"[train] cool-down requested: the learning rate decays from step {self.step}")
        return stop

    def _train_step(self, step_batches, lr: float, n_no_grad: int, n_grad: int) -> float:
        """One optimizer step on this rank's micro-batches; returns the loss averaged over ranks."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.heartbeat.progress(self.step + 1, "forward/backward")
        micro_losses = []
        skipped_before = self.engine.skipped_steps
        row = self.ranks.rank * self.loader.per_rank  # this rank's first row in the global batch
        for inputs, labels in step_batches:
            # each row's initial-state noise is keyed by (seed, step, its place in the global batch):
            # the same for any spread of the rows over ranks
            seeds = row_noise_seeds(self.run.train.seed, self.step, range(row, row + len(inputs)))
            row += len(inputs)
            with self.attention_kernels():
                out = self.engine(inputs.to(self.device), num_steps=(n_no_grad, n_grad),
                                  labels=labels.to(self.device), return_logits=False, state_seeds=seeds)
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
        loss, rel_change, state_norm = mean_over_ranks(
            [sum(micro_losses) / len(micro_losses), rel_change, state_norm], self.device)
        self.state_diagnostics = {"state/rel_change": rel_change, "state/norm": state_norm}
        skipped = self.engine.skipped_steps > skipped_before or not math.isfinite(loss)
        self.skipped_steps += skipped
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        if skipped:
            self.log(f"[train] step {self.step}: non-finite loss or gradient, update skipped "
                     f"({self.consecutive_skips} in a row, {self.skipped_steps} in all)")
        if skipped or self.step == self.start_step + 1:  # from a segment's first step on: a flat 0 is news too
            self.sink.scalars(self.step, {"train/skipped_steps": self.skipped_steps})
        if self.consecutive_skips >= self.run.train.max_consecutive_skips:
            raise TrainingError(f"rank {self.ranks.rank}: {self.consecutive_skips} consecutive steps with a "
                                f"non-finite loss or gradient (train.max_consecutive_skips = "
                                f"{self.run.train.max_consecutive_skips}); stopping at step {self.step}")
        return loss

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
            n_no_grad, n_grad = self.sampler(self.step)
            loss = self._train_step(step_batches, lr, n_no_grad, n_grad)
            losses.append(loss)
            self.sink.step_record({"step": self.step, "loss": loss, "lr": lr, "recurrence": [n_no_grad, n_grad],
                                   "time": round(time.time(), 4)})
            window_tokens += tokens_per_step
            window_flops += tokens_per_step * flops_per_token(run.model, run.model.max_seq_len, n_no_grad, n_grad)
            if self.step % tc.log_interval == 0 or self.step == tc.max_steps:
                elapsed = time.perf_counter() - window_start
                self._log_step(loss, lr, n_no_grad + n_grad, window_tokens / elapsed,
                               window_flops / elapsed / self.ranks.world_size)
                window_start, window_tokens, window_flops = time.perf_counter(), 0, 0.0
            # evaluation time is not training time: the throughput window skips it
            window_start += self.evaluate(last=self.step == tc.max_steps)
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
            self.evaluate(last=True)
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
        scalars = {"train/loss": loss, "train/lr": lr, "train/recurrence": depth, "train/tokens_per_s": tokens_per_s,
                   "train/tflops_per_gpu": tflops, "train/mfu": mfu, "train/mem_gib": mem, **self.state_diagnostics,
                   **self.loader.source_scalars(self.step)}
        if grad_norm is not None:
            scalars["train/grad_norm"] = float(grad_norm)
        self.sink.scalars(self.step, scalars)

    def evaluate(self, last: bool = False) -> float:
        """Run the evaluators that are due (all of them when `last`) through the engine's forward;
        returns the seconds spent."""
        due = [e for e in self.evaluators if e.due(self.step, last)]
        if not due:
            return 0.0
        started = time.perf_counter()
        self.heartbeat.progress(self.step, "evaluation")
        self.engine.eval()

        def forward(*args, **kwargs):
            with self.attention_kernels():
                return self.engine(*args, **kwargs)

        try:
            for evaluator in due:
                result = evaluator.evaluate(forward, self.step)
                self.log(f"[train] {result.summary}")
                self.sink.scalars(self.step, result.scalars)
                self.sink.images(self.step, result.images)
        finally:
            self.engine.train()
        return time.perf_counter() - started

    def write_run_state(self, state: str, **details):
        """RUN_DIR/run_state.json: how the run ended (read by `rdhpc status` and the Slurm job);
        only by the run folder's owner."""
        if self.ranks.is_main and self.lock.held:
            self.folder.write_run_state(state, self.step, start_step=self.start_step, **details)

    def close(self, failed: bool = False):
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        if self.sink is not None:
            self.sink.close()
        self.log.close()
        self.lock.release()
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

    How a failure ends: a user's mistake (UserError: a config, a shard, a checkpoint, NaN steps)
    keeps its one-line message; a broken collective (a peer died, froze or timed out) becomes a
    TrainingError naming the ranks at fault as their heartbeats tell; anything else is a bug and
    is re-raised as it is, with its traceback, after the run state records it."""
    trainer = Trainer(run, ranks, log)
    failed = True
    try:
        trainer.setup()
        trainer.maybe_resume()
        result = trainer.train()
        failed = False
        trainer.heartbeat.stop("done")
        if result.completed:
            trainer.write_run_state("completed")
        else:
            trainer.write_run_state("stopped", reason=result.stop_reason, terminated=result.terminated)
    except UserError as exc:
        trainer.heartbeat.stop(f"failed: {exc}"[:500])
        trainer.write_run_state("failed", error=str(exc)[:2000])
        trainer.log.to_file(f"[train] failed: {exc}")
        raise
    except Exception as exc:
        trainer.heartbeat.stop(f"failed: {type(exc).__name__}: {exc}"[:500])
        # Give the others one beat to record their own failure, so the silent ones stand out.
        time.sleep(1.5 * run.train.heartbeat_interval_s)
        report = diagnose(trainer.heartbeat.folder, ranks.world_size, run.train.heartbeat_interval_s,
                          self_rank=ranks.rank)
        suspects = find_suspects(trainer.heartbeat.folder, ranks.world_size, run.train.heartbeat_interval_s,
                                 self_rank=ranks.rank)
        message = (f"rank {ranks.rank} failed at step {trainer.step}: {type(exc).__name__}: "
                   f"{str(exc).splitlines()[0] if str(exc) else ''}. {report}")
        trainer.write_run_state("failed", error=message)
        trainer.log.to_file(f"[train] failed: {message}")
        if is_collective_failure(exc):
            raise PeerFailure(message, suspects) from exc
        if hasattr(exc, "add_note"):  # the traceback of a bug, with what the heartbeats say
            exc.add_note(message)
        raise
    finally:
        trainer.close(failed=failed)  # releases the run folder's lock: after the last write to the folder
    return result
