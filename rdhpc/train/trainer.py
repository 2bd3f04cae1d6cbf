"""The DeepSpeed trainer of recurrent-depth models, in phases: set up, (resume), train, validate, save.

    rdhpc train configs/debug.yaml --set data.train_dir=shards/          # one process
    rdhpc launch local configs/debug.yaml --nproc 2 --set ...            # N local ranks (gloo on CPU)

Every rank draws the same depth per optimizer step from (train.seed, step); the first n iterations
run without gradient, the last k with it. Checkpoints are DeepSpeed checkpoints plus the loader
position, the RNG state of every rank and the config; the `latest` pointer moves only after every
rank finished writing, so a run killed at any moment resumes from the last complete one.
"""

from __future__ import annotations

import datetime
import importlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from rdhpc.config import ConfigError, RunConfig, save_config
from rdhpc.data.loader import BatchLoader, ShardDataset, inputs_and_labels
from rdhpc.distributed import RankInfo
from rdhpc.errors import UserError
from rdhpc.model import DepthSampler, RecurrentDepthModel
from rdhpc.train.deepspeed_config import build_deepspeed_config
from rdhpc.train.metrics import flops_per_token
from rdhpc.train.optim import LRSchedule, build_optimizer, skip_non_finite_steps

LATEST = "latest"
STATE_DIR = "rdhpc"
# Fault injection for tests and drills: "3,4" makes rank 0's loss NaN at optimizer steps 3 and 4.
FAULT_NAN_STEPS = "RDHPC_FAULT_NAN_STEPS"
# `touch RUN_DIR/COOLDOWN` asks a trapezoid schedule to start its cool-down at the next step.
COOLDOWN_REQUEST = "COOLDOWN"


class TrainingError(UserError, RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); every rank raises it."""


def _skip_deepspeed_shm_op():
    """deepspeed.initialize builds a shared-memory op used only for inference all-reduce on CPU; it
    compiles for 30-60 s. Training never uses it."""
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


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
            _skip_deepspeed_shm_op()
        self._init_distributed(backend="nccl" if use_cuda else "gloo")
        import deepspeed

        self.dataset = ShardDataset(run.data.train_dir, "train", seq_len=run.model.max_seq_len)
        vocab = self.dataset.manifest.tokenizer.vocab_size
        if vocab > run.model.padded_vocab_size:
            raise ConfigError([f"model.vocab_size: the shards' tokenizer has {vocab} tokens, the model "
                               f"embeds {run.model.padded_vocab_size}"])
        self.val_dataset = ShardDataset(run.data.val_dir or run.data.train_dir, "val", seq_len=run.model.max_seq_len)
        self.loader = BatchLoader(self.dataset, run.train.global_batch_size, run.train.micro_batch_size,
                                  self.ranks.rank, self.ranks.world_size, seed=run.data.shuffle_seed,
                                  on_exhausted=run.data.on_exhausted, prefetch_steps=run.data.prefetch_batches)

        torch.manual_seed(run.train.seed)  # the same initial weights on every rank
        model = RecurrentDepthModel(run.model)
        self.ds_config = build_deepspeed_config(run, self.ranks.world_size)
        optimizer = build_optimizer(model, run.optim)
        if run.zero.stage == 0:
            optimizer = skip_non_finite_steps(optimizer)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=self.ds_config)
        self.sampler = DepthSampler.from_model_config(run.model, seed=run.train.seed)
        self.schedule = LRSchedule(run.schedule, run.optim.lr, run.train.max_steps)
        torch.manual_seed(run.train.seed + 1000 * self.ranks.rank)  # initial-state noise differs per rank
        if self.ranks.is_main:
            save_config(run, self.run_dir)
            (self.run_dir / "deepspeed.json").write_text(json.dumps(self.ds_config, indent=2))
            if run.logging.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        counts = model.parameter_counts()
        self.log(f"[train] {counts['total']:,} parameters on {self.ranks.world_size} rank(s) ({self.device.type}), "
                 f"ZeRO {run.zero.stage}, {run.train.precision}, global batch {run.train.global_batch_size} x "
                 f"{run.model.max_seq_len} tokens, {self.ds_config['gradient_accumulation_steps']} micro-step(s) per step")

    def _init_distributed(self, backend: str):
        import deepspeed
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=float(os.environ.get("RDHPC_COLLECTIVE_TIMEOUT_S", 600)))
        # ZeRO clones the world group with torch's default timeout (30 min): bound that one too.
        dist.distributed_c10d.default_pg_timeout = timeout
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.update(RANK=str(self.ranks.rank), WORLD_SIZE=str(self.ranks.world_size),
                          LOCAL_RANK=str(self.ranks.local_rank))
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout, auto_mpi_discovery=False)

    # ---- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self):
        import torch.distributed as dist

        tag = f"step{self.step:08d}"
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
            tags = sorted(p.name for p in self.checkpoint_dir.glob("step*") if p.is_dir())
            for old in tags[:-self.run.checkpoint.keep_last]:
                shutil.rmtree(self.checkpoint_dir / old, ignore_errors=True)
        dist.barrier()
        self.log(f"[train] saved checkpoint {self.checkpoint_dir / tag}")

    def maybe_resume(self):
        resume = self.run.checkpoint.resume
        if resume == "never":
            return
        folder, tag = self.checkpoint_dir, None
        if resume not in ("auto",):
            folder, tag = Path(resume).parent, Path(resume).name
        elif (folder / LATEST).exists():
            tag = (folder / LATEST).read_text().strip()
        if tag is None:
            return
        state_dir = folder / tag / STATE_DIR
        state = json.loads((state_dir / "trainer_state.json").read_text())
        if state["world_size"] != self.ranks.world_size:
            raise ConfigError([f"checkpoint.resume: {folder / tag} was written by {state['world_size']} ranks, this run "
                               f"has {self.ranks.world_size}; convert it to a universal checkpoint first"])
        self.engine.load_checkpoint(str(folder), tag=tag)
        self.step = state["step"]
        self.skipped_steps, self.consecutive_skips = state["skipped_steps"], state["consecutive_skips"]
        self.cooldown_start = state["cooldown_start"]
        self.loader.load_state_dict(state["loader"])
        rng = torch.load(state_dir / f"rng_rank{self.ranks.rank}.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.log(f"[train] resumed from {folder / tag} at step {self.step}")

    # ---- training -----------------------------------------------------------------------------
    def _mean_over_ranks(self, values: list[float]) -> list[float]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.ranks.world_size).tolist()

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank if it is true on one: ranks may see a new file at different steps."""
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def train(self) -> list[float]:
        run, tc = self.run, self.run.train
        losses = []
        tokens_per_step = tc.global_batch_size * run.model.max_seq_len
        window_start, window_tokens, window_flops = time.perf_counter(), 0, 0.0
        for step_batches in self.loader:
            if self.step >= tc.max_steps:
                break
            if self.cooldown_start is None and self._any_rank((self.run_dir / COOLDOWN_REQUEST).exists()):
                self.cooldown_start = self.step
                self.log(f"[train] cool-down requested: the learning rate decays from step {self.step}")
            lr = self.schedule(self.step, self.cooldown_start)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            n_no_grad, n_grad = self.sampler(self.step)
            micro_losses = []
            skipped_before = self.engine.skipped_steps
            for inputs, labels in step_batches:
                out = self.engine(inputs.to(self.device), num_steps=(n_no_grad, n_grad), labels=labels.to(self.device),
                                  return_logits=False)
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
                    f.write(json.dumps({"step": self.step, "loss": loss, "lr": lr,
                                        "recurrence": [n_no_grad, n_grad]}) + "\n")
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
        if self.step < tc.max_steps and losses and self.step % run.checkpoint.interval:
            self.log(f"[train] the training data ran out at step {self.step} (data.on_exhausted = stop)")
            self.validate()
            self.save_checkpoint()
        return losses

    def _log_step(self, loss, lr, depth, tokens_per_s, flops_per_s_per_device):
        tflops = flops_per_s_per_device / 1e12
        mfu = tflops / self.run.train.peak_tflops_per_device
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

    def close(self):
        if self.writer is not None:
            self.writer.close()


def train(run: RunConfig, ranks: RankInfo, log=print) -> list[float]:
    """The whole job: set up, resume if there is a checkpoint, train, always tear down."""
    trainer = Trainer(run, ranks, log)
    try:
        trainer.setup()
        trainer.maybe_resume()
        return trainer.train()
    finally:
        trainer.close()
