"""Checkpoints of a training run, in one place: tags, the `latest` pointer, retention, the resume
point, the conversion to DeepSpeed's universal format, saving and loading. The trainer only calls
`find_resume_point`, `load` and `save`; `rdhpc export` and `rdhpc eval` read the same layout.

    CHECKPOINT_DIR/
      latest                    the tag of the newest COMPLETE checkpoint (moved after every rank wrote)
      step00000128/             DeepSpeed's files (model states, ZeRO partitions) and
        rdhpc/                  rdhpc's own: trainer_state.json (step, loader position, counters),
                                rng_rank{r}.pt, config.yaml, deepspeed.json
      step00000128_universal/   the same, converted for another number of ranks (once, on resume)

A run killed at any moment resumes from the last complete checkpoint: a tag folder becomes the
resume point only through `latest`, which rank 0 rewrites atomically after a barrier.

Nothing in a checkpoint can run code: every file is read with `torch.load(weights_only=True)`
(`safe_torch_load`), DeepSpeed's own loaders and its universal conversion included, with only
three of DeepSpeed's plain record classes allowed. A checkpoint folder on a shared file system may
come from anyone; a crafted pickle in it is an error naming the file, never code that runs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rdhpc.config.loader import CONFIG_FILE_NAME as RUN_CONFIG
from rdhpc.distributed.collectives import barrier
from rdhpc.errors import ConfigError, UserError

LATEST = "latest"
STATE_DIR = "rdhpc"  # rdhpc's own files inside a tag folder
TRAINER_STATE = "trainer_state.json"
DEEPSPEED_CONFIG = "deepspeed.json"
UNIVERSAL_SUFFIX = "_universal"
CONVERTED = "converted.json"  # rdhpc's marker inside a universal conversion it made
CONVERTING = "converting.json"  # ... and while it makes it
TAG_PATTERN = "step[0-9]*"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be resumed from or converted; the message names the path."""


@contextlib.contextmanager
def safe_torch_load():
    """Inside: every `torch.load` (DeepSpeed's checkpoint engine, its ZeRO and universal loaders,
    zero_to_fp32) loads tensors and plain types only, plus DeepSpeed's LossScaler, ZeroStageEnum
    and fragment_address records (all that its checkpoint files hold at ZeRO 0-3, fp32 and bf16:
    611 files of this project's tests checked). A file that holds anything else, or is no
    checkpoint file at all, raises CheckpointError naming it."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    original = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
                return original(f, *args, **kwargs)
        except Exception as exc:  # an unpickling refusal, a truncated or foreign file
            first = (str(exc).strip().splitlines() or [""])[0]
            raise CheckpointError(f"{f}: not a checkpoint file rdhpc reads ({type(exc).__name__}: {first}); "
                                  f"nothing in it was run") from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


def read_latest(folder: str | Path) -> str | None:
    """The tag `latest` points to, None when there is no pointer."""
    pointer = Path(folder) / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def state_dir(tag_dir: str | Path) -> Path:
    return Path(tag_dir) / STATE_DIR


def is_tag_folder(path: str | Path) -> bool:
    """A checkpoint tag folder: rdhpc's trainer state or DeepSpeed's model states are there."""
    path = Path(path)
    return path.is_dir() and ((state_dir(path) / TRAINER_STATE).is_file()
                              or any(path.glob("*mp_rank_*_model_states.pt")))


def rng_file(tag_dir: Path, rank: int) -> Path:
    return state_dir(tag_dir) / f"rng_rank{rank}.pt"


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


class Checkpointer:
    """Save and resume the checkpoints of one run from every rank. `any_rank(flags)` is the
    collective that makes a failure seen by rank 0 known to all."""

    def __init__(self, folder: str | Path, rank: int, world_size: int, keep_last: int, any_rank, log=print):
        self.folder = Path(folder)
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last
        self.any_rank = any_rank
        self.log = log

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- where to resume ------------------------------------------------------------------------
    def find_resume_point(self, resume: str, zero_stage: int) -> ResumePoint | None:
        """The checkpoint to resume from (checkpoint.resume: 'auto', 'never' or a tag folder),
        decided before the engine is built: a checkpoint of another number of ranks must be converted
        to DeepSpeed's universal format, and the engine must be told so in its config."""
        if resume == "never":
            return None
        if resume == "auto":
            folder, tag = self.folder, read_latest(self.folder)
            if tag is None:
                return None
        else:
            folder, tag = Path(resume).parent, Path(resume).name
        trainer_state = state_dir(folder / tag) / TRAINER_STATE
        try:
            state = json.loads(trainer_state.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError([f"checkpoint.resume: {folder / tag} is not a complete rdhpc checkpoint "
                               f"({trainer_state}: {exc})"]) from None
        point = ResumePoint(folder, tag, state, load_tag=tag)
        if state["world_size"] != self.world_size and zero_stage > 0:
            # ZeRO partitions optimizer state (and at stage 3 the weights) by rank: another world
            # size needs the universal format. Stage 0 keeps whole copies and loads as it is.
            point.load_tag = tag + UNIVERSAL_SUFFIX
            self._convert_to_universal(point, zero_stage)
        return point

    def _convert_to_universal(self, point: ResumePoint, zero_stage: int):
        target = point.folder / point.load_tag
        done_marker = state_dir(target) / CONVERTED
        error = None  # rank 0's, when the conversion fails
        if self.is_main and not done_marker.exists():
            self.log(f"[train] {point.path} was written by {point.state['world_size']} ranks, this run has "
                     f"{self.world_size}: converting it to a universal checkpoint in {target}")
            error = self._run_conversion(point, target, zero_stage)
        failed, = self.any_rank([error is not None])
        if failed:
            raise CheckpointError(f"rank {self.rank}: converting {point.path} to a universal checkpoint failed"
                                  + (f": {error}" if error else " on rank 0"))

    def _run_conversion(self, point: ResumePoint, target: Path, zero_stage: int) -> str | None:
        """ds_to_universal into `target`; the error text, or None. A target left by an interrupted
        conversion of rdhpc's (its in-progress marker) is redone; anything else there is not ours."""
        if target.exists():
            if not (state_dir(target) / CONVERTING).is_file():
                return f"{target} exists and was not written by rdhpc's conversion: move it away, nothing was deleted"
            shutil.rmtree(target)
        state_dir(target).mkdir(parents=True)
        (state_dir(target) / CONVERTING).write_text(json.dumps({"source": point.tag, "time": time.time()}))
        # DeepSpeed's ds_to_universal, with every torch.load restricted (rdhpc.train.universal)
        command = [sys.executable, "-m", "rdhpc.train.universal", "--input_folder", str(point.path),
                   "--output_folder", str(target), "--num_extract_workers", "2", "--num_merge_workers", "2"]
        if zero_stage in (1, 2):
            command.append("--inject_missing_state")  # stages 1 and 2 lack what the loader looks for
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            return f"{' '.join(command)} failed:\n{done.stderr[-3000:]}"
        (state_dir(target) / CONVERTED).write_text(json.dumps({"source": point.tag,
                                                               "seconds": time.perf_counter() - started}))
        return None

    # ---- loading ----------------------------------------------------------------------------------
    def load(self, engine, point: ResumePoint, reseed) -> dict:
        """Load the engine's state and this rank's RNG state; return the trainer state. A rank the
        checkpoint did not have calls `reseed()` for a fresh stream."""
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        settings = [{k: v for k, v in group.items() if k != "params"} for group in inner.param_groups]
        try:
            with safe_torch_load():
                engine.load_checkpoint(str(point.folder), tag=point.load_tag)
        except CheckpointError:
            raise
        except Exception as exc:  # e.g. a model or optimizer of another shape: keep DeepSpeed's whole message
            detail = "\n    ".join(str(exc).strip().splitlines()[:20])
            raise CheckpointError(f"{point.path}: cannot be loaded into this run's model and optimizer "
                                  f"({type(exc).__name__}):\n    {detail}") from exc
        if point.universal:
            # DeepSpeed 0.19's universal loader at ZeRO 3 copies parameter group 0's settings into
            # every group (weight decay reached the norms: a resize then drifted by 3e-4 in 3 steps).
            # The groups' settings are the config's; the state (moments, step) is the checkpoint's.
            for group, own in zip(inner.param_groups, settings):
                group.update(own)
        rng = rng_file(point.path, self.rank)
        if rng.exists():
            with safe_torch_load():  # tensors only: an RNG state file never needs to run code to be read
                state = torch.load(rng)
            torch.set_rng_state(state["torch"])
            if state["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda"])
        else:
            reseed()
        changed = "" if point.state["world_size"] == self.world_size else \
            f" (written by {point.state['world_size']} ranks, now {self.world_size})"
        self.log(f"[train] resumed from {point.path} at step {point.state['step']}{changed}")
        return point.state

    # ---- saving -----------------------------------------------------------------------------------
    def save(self, engine, step: int, trainer_state: dict, files: dict[str, str]) -> Path:
        """Every rank writes its part (DeepSpeed's files, its RNG state); rank 0 adds the trainer
        state and `files` (name -> text: the run config, the DeepSpeed JSON). Only after a barrier
        does `latest` move, then old checkpoints beyond keep_last go."""
        tag = tag_for_step(step)
        new = not (self.folder / tag).exists()
        error = None
        try:
            engine.save_checkpoint(str(self.folder), tag=tag, save_latest=False)
            own = state_dir(self.folder / tag)
            own.mkdir(parents=True, exist_ok=True)
            torch.save({"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                       rng_file(self.folder / tag, self.rank))
            if self.is_main:
                (own / TRAINER_STATE).write_text(json.dumps({"step": step, "world_size": self.world_size,
                                                             **trainer_state}))
                for name, text in files.items():
                    (own / name).write_text(text)
        except Exception as exc:  # a full disk (torch.save says "file write failed"), a quota, a lost mount
            error = exc
        if self.any_rank([error is not None])[0]:  # every rank stops here, none waits in the barrier
            self._failed_save(tag, new, error)
        barrier()  # every rank finished writing: only now may the pointer move
        if self.is_main:
            tmp = self.folder / (LATEST + ".tmp")
            tmp.write_text(tag)
            os.replace(tmp, self.folder / LATEST)
            self._retain()
        barrier()
        self.log(f"[train] saved checkpoint {self.folder / tag}")
        return self.folder / tag

    def _failed_save(self, tag: str, new: bool, error: Exception | None):
        """The save of `tag` failed on some rank: `latest` still names the last complete checkpoint.
        The incomplete folder is rdhpc's own (it did not exist before), so rank 0 removes it."""
        free = shutil.disk_usage(self.folder).free if self.folder.exists() else 0
        if self.is_main and new:
            shutil.rmtree(self.folder / tag, ignore_errors=True)
        if error is None:
            what = "another rank could not write its part"
        elif (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or free < (1 << 20) \
                or "write failed" in str(error):  # torch.save's own words for a full disk
            what = f"no space left on the device of {self.folder} ({free / 2 ** 20:.1f} MiB free)"
        else:
            what = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
        latest = read_latest(self.folder)
        kept = f"the latest complete checkpoint, {self.folder / latest}, is untouched" if latest \
            else "no complete checkpoint exists yet"
        removed = " and the incomplete one was removed" if new else ""
        raise CheckpointError(f"rank {self.rank}: saving checkpoint {tag} failed: {what}; {kept}{removed}. Free space "
                              f"(or set checkpoint.dir elsewhere) and start the run again: it resumes from the latest "
                              f"complete checkpoint.")

    def _retain(self):
        """Keep the newest keep_last checkpoints. Only folders rdhpc wrote are ever deleted: a tag
        folder with rdhpc's trainer state, and its universal conversion with rdhpc's marker; a
        stepNNNNNNNN folder of anyone else's stays (and does not count)."""
        tags = sorted(p.name for p in self.folder.glob(TAG_PATTERN)
                      if not p.name.endswith(UNIVERSAL_SUFFIX) and (state_dir(p) / TRAINER_STATE).is_file())
        for old in tags[:-self.keep_last]:
            shutil.rmtree(self.folder / old, ignore_errors=True)
            converted = self.folder / (old + UNIVERSAL_SUFFIX)
            if (state_dir(converted) / CONVERTED).is_file():
                shutil.rmtree(converted, ignore_errors=True)
