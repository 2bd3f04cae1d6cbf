"""Checkpoints in and out: DeepSpeed ZeRO checkpoints (any stage), one safetensors file, the released
Huginn layout. Everything here runs on a CPU; nothing needs a GPU or the ranks that wrote the checkpoint.

    rdhpc export runs/x/checkpoints --out model.safetensors              # ZeRO 0-3 -> one file + config
    rdhpc export runs/x/checkpoints --format huginn --out huginn/        # the released layout
    rdhpc export huginn/ --out model.safetensors                         # and back
    rdhpc export runs/x/checkpoints/step00000128 --out m.safetensors --dtype bf16

`load_checkpoint(path)` reads any of these kinds (a checkpoint folder with a `latest` pointer, one
tag folder `stepNNNNNNNN`, a run folder, an exported `.safetensors` file, a released-layout folder)
and is what `rdhpc eval` and `rdhpc generate` use. `load_initial_weights(model, path)` starts a
training run from any of them (`checkpoint.init_from`), e.g. from the released Huginn weights.

ZeRO stage 0 keeps the whole module in `mp_rank_00_model_states.pt`; stages 1-3 are consolidated from
the float32 master partitions with DeepSpeed's zero_to_fp32 (bf16 runs give their float32 masters).
Files are read through rdhpc.train.checkpoint.safe_torch_load (`torch.load(weights_only=True)` with
DeepSpeed's three plain record classes allowed): nothing else is unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from rdhpc.errors import UserError
from rdhpc.model.config import ModelConfig
from rdhpc.model.huginn import CONFIG_FILE, WEIGHTS_FILE, load_huginn, save_huginn, write_safetensors
from rdhpc.model.recurrent_depth import RecurrentDepthModel
from rdhpc.run_folder import RunFolder
from rdhpc.train.checkpoint import (DEEPSPEED_CONFIG, LATEST, RUN_CONFIG, TRAINER_STATE, CheckpointError,
                                    is_tag_folder, read_latest, safe_torch_load, state_dir)

FORMATS = ("safetensors", "huginn")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
META_MODEL_CONFIG = "rdhpc.model_config"
META_RUN_CONFIG = "rdhpc.run_config"
META_STEP = "rdhpc.step"
META_SOURCE = "rdhpc.source"
META_TOKENIZER = "rdhpc.tokenizer"
TOKENIZER_FILE = "tokenizer.json"


class ExportError(UserError, ValueError):
    """A checkpoint that cannot be found, read or converted; the message names the path."""


@dataclass
class LoadedCheckpoint:
    model: RecurrentDepthModel
    kind: str  # "deepspeed", "safetensors" or "huginn"
    path: Path  # the tag folder, file or folder actually read
    step: int | None = None
    run_config: object | None = None  # rdhpc.config.RunConfig when the checkpoint carries one
    tokenizer: str | None = None  # path of the tokenizer the model was trained with, when known
    tokenizer_note: str | None = None  # why `tokenizer` is None, for the message of whoever needs one

    def tokenizer_or_none_with_reason(self) -> tuple[str | None, str]:
        """(tokenizer, "") or (None, "CHECKPOINT: no tokenizer known (WHY)")."""
        if self.tokenizer:
            return self.tokenizer, ""
        return None, f"{self.path}: no tokenizer known for this checkpoint ({self.tokenizer_note or 'none recorded'})"


# ---- DeepSpeed checkpoints ------------------------------------------------------------------------

def resolve_deepspeed(path: str | Path) -> tuple[Path, str] | None:
    """(checkpoint folder, tag) for a checkpoint folder with `latest`, a tag folder or a run folder;
    None when `path` is not a DeepSpeed checkpoint."""
    path = Path(path)
    for folder in (path, RunFolder(path).checkpoints):
        tag = read_latest(folder)
        if tag is not None:
            if not is_tag_folder(folder / tag):
                raise ExportError(f"{folder / LATEST}: points to {tag!r}, which is not a complete checkpoint")
            return folder, tag
    if is_tag_folder(path):
        return path.parent, path.name
    return None


def zero_stage(tag_dir: Path) -> int:
    """The ZeRO stage a checkpoint was written with: from the run's saved DeepSpeed JSON, else from
    the files (stage 0 writes no optimizer partitions)."""
    ds_json = state_dir(tag_dir) / DEEPSPEED_CONFIG
    if ds_json.is_file():
        return int(json.loads(ds_json.read_text()).get("zero_optimization", {}).get("stage", 0))
    return 1 if any(tag_dir.glob("*optim_states.pt")) else 0


def consolidated_state_dict(folder: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """The full float32 state dict of a DeepSpeed checkpoint of any ZeRO stage, on the CPU."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    tag_dir = Path(folder) / tag
    stage = zero_stage(tag_dir)
    try:
        if stage == 0:
            states = tag_dir / "mp_rank_00_model_states.pt"
            if not states.is_file():
                raise ExportError(f"{states}: not found (a ZeRO stage-0 checkpoint keeps its weights there)")
            with safe_torch_load():
                module = torch.load(states, map_location="cpu")["module"]
            return {name: t.float() for name, t in module.items()}
        from deepspeed.utils import zero_to_fp32

        with safe_torch_load(), open(os.devnull, "w") as quiet, \
                contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):  # its progress bars
            state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
        return {name: t.float().contiguous() for name, t in state.items()}
    except ExportError:
        raise
    except CheckpointError as exc:  # it names the file that holds more than weights, or no weights
        raise ExportError(f"{tag_dir}: cannot consolidate this ZeRO stage-{stage} checkpoint: {exc}") from None
    except Exception as exc:  # truncated files, missing rank partitions
        raise ExportError(f"{tag_dir}: cannot consolidate this ZeRO stage-{stage} checkpoint ({type(exc).__name__}: "
                          f"{exc})") from None


def _load_deepspeed(folder: Path, tag: str, device, dtype) -> LoadedCheckpoint:
    from rdhpc.config import config_from_checkpoint

    tag_dir = folder / tag
    config_file = state_dir(tag_dir) / RUN_CONFIG
    if not config_file.is_file():
        raise ExportError(f"{config_file}: not found (rdhpc writes the run config into every checkpoint; "
                          "without it the model shape is unknown)")
    run = config_from_checkpoint(state_dir(tag_dir))
    state = consolidated_state_dict(folder, tag)
    model = _model_with_state(run.model, state, str(tag_dir), device, dtype)
    step = None
    trainer_state = state_dir(tag_dir) / TRAINER_STATE
    if trainer_state.is_file():
        step = json.loads(trainer_state.read_text()).get("step")
    tokenizer, note = _tokenizer_of_run(run)
    return LoadedCheckpoint(model, "deepspeed", tag_dir, step, run, tokenizer, note)


def _tokenizer_of_run(run) -> tuple[str | None, str | None]:
    """(path, None) of the tokenizer recorded in the manifest of the run's training shards, or
    (None, why it is not known) for the message of the command that needs it."""
    if run is None or not run.data.first_dir():
        return None, "the checkpoint records no training data"
    train_dir = Path(run.data.first_dir())
    manifest = train_dir / "manifest.json"
    if not manifest.is_file():
        relative = "" if train_dir.is_absolute() else (
            f" (a path relative to the folder the run was started from: this checkpoint was written before "
            f"rdhpc recorded paths absolutely; run the command from that folder)")
        return None, f"its data.train_dir {train_dir}/manifest.json is not found from {Path.cwd()}{relative}"
    try:
        path = json.loads(manifest.read_text()).get("tokenizer", {}).get("path")
    except (OSError, ValueError) as exc:
        return None, f"{manifest}: unreadable ({exc})"
    if not path:
        return None, f"{manifest} records no tokenizer path"
    if not Path(path).is_file():
        return None, f"the tokenizer {path} recorded in {manifest} is gone"
    return path, None


def _model_with_state(config: ModelConfig, state: dict, source: str, device, dtype) -> RecurrentDepthModel:
    with torch.device("meta"):
        model = RecurrentDepthModel(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ExportError(f"{source}: tensors do not match the config's model (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]})")
    for name, ref in expected.items():
        if tuple(state[name].shape) != tuple(ref.shape):
            raise ExportError(f"{source}: tensor {name!r} has shape {tuple(state[name].shape)}, the config implies "
                              f"{tuple(ref.shape)}")
    model = model.to_empty(device=device)
    model.load_state_dict(state, strict=True)
    return model.to(dtype) if dtype is not None else model


# ---- one safetensors file with its config -----------------------------------------------------------

def save_safetensors(model: RecurrentDepthModel, path: str | Path, run_config=None, step: int | None = None,
                     source: str | None = None, tokenizer: str | None = None,
                     dtype: torch.dtype | None = None) -> Path:
    """One file: every tensor under our own names, the model config (JSON) and, when known, the run
    config (YAML), step, source checkpoint and tokenizer path in the safetensors metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = dtype or next(model.parameters()).dtype
    tensors = {name: t.detach().to(dtype).contiguous().cpu() for name, t in model.state_dict().items()}
    metadata = {"format": "pt", META_MODEL_CONFIG: json.dumps(model.config.to_dict())}
    if run_config is not None:
        from rdhpc.config import config_to_yaml

        metadata[META_RUN_CONFIG] = config_to_yaml(run_config)
    if step is not None:
        metadata[META_STEP] = str(step)
    if source is not None:
        metadata[META_SOURCE] = str(source)
    if tokenizer is not None:
        metadata[META_TOKENIZER] = os.path.abspath(tokenizer)  # read from wherever the file is used
    return write_safetensors(tensors, path, metadata)


def _load_safetensors(path: Path, device, dtype) -> LoadedCheckpoint:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own types for bad headers
        raise ExportError(f"{path}: not a readable safetensors file ({exc})") from None
    if META_MODEL_CONFIG not in metadata:
        raise ExportError(f"{path}: no {META_MODEL_CONFIG!r} in its metadata (not written by `rdhpc export`; "
                          "for the released layout pass its folder)")
    try:
        config = ModelConfig(**json.loads(metadata[META_MODEL_CONFIG]))
    except (TypeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: bad {META_MODEL_CONFIG} metadata ({exc})") from None
    problems = config.problems()
    if problems:
        raise ExportError(f"{path}: {META_MODEL_CONFIG}: " + "; ".join(problems))
    run = None
    if META_RUN_CONFIG in metadata:
        import yaml

        from rdhpc.config import config_from_dict

        run = config_from_dict(yaml.safe_load(metadata[META_RUN_CONFIG]), source=f"{path} ({META_RUN_CONFIG})",
                               written_by_rdhpc=True)
    stored_dtype = next(iter(state.values())).dtype if state else None
    model = _model_with_state(config, state, str(path), device, dtype or stored_dtype)  # as stored by default
    step = int(metadata[META_STEP]) if META_STEP in metadata else None
    tokenizer, note = metadata.get(META_TOKENIZER), None
    if not tokenizer:
        note = f"the file's {META_TOKENIZER} metadata is empty (exported without one)"
    elif not Path(tokenizer).is_file():
        tokenizer, note = None, f"the tokenizer {metadata[META_TOKENIZER]} named in its metadata is gone"
    return LoadedCheckpoint(model, "safetensors", path, step, run, tokenizer, note)


# ---- any kind ----------------------------------------------------------------------------------------

def checkpoint_kind(path: str | Path) -> str:
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return "safetensors"
    if path.is_dir() and (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        return "huginn"
    if path.exists() and resolve_deepspeed(path) is not None:
        return "deepspeed"
    if not path.exists():
        raise ExportError(f"{path}: no such file or folder")
    raise ExportError(f"{path}: not a checkpoint (expected a DeepSpeed checkpoint folder with '{LATEST}', a "
                      f"stepNNNNNNNN tag folder, a run folder, a .safetensors file from `rdhpc export`, or a "
                      f"folder with {CONFIG_FILE} + {WEIGHTS_FILE})")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> LoadedCheckpoint:
    """The model of any checkpoint kind, in eval mode, with what is known about its run."""
    path = Path(path)
    kind = checkpoint_kind(path)
    if kind == "safetensors":
        loaded = _load_safetensors(path, device, dtype)
    elif kind == "huginn":
        model = load_huginn(path, device=device, dtype=dtype)
        tokenizer = path / TOKENIZER_FILE
        loaded = LoadedCheckpoint(model, "huginn", path, tokenizer=str(tokenizer.resolve()) if tokenizer.is_file() else None,
                                  tokenizer_note=f"the folder has no {TOKENIZER_FILE}")
    else:
        folder, tag = resolve_deepspeed(path)
        loaded = _load_deepspeed(folder, tag, device, dtype)
    loaded.model.eval()
    return loaded


def _check_destination(source: Path, out: Path, fmt: str, force: bool) -> None:
    """An export never replaces its own source, and replaces another export only with --force."""
    src, dst = source.resolve(), out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise ExportError(f"--out {out}: that is (or holds, or lies inside) the source checkpoint {source}; "
                          f"write the export elsewhere")
    existing = [out] if fmt == "safetensors" and out.exists() else \
        [out / name for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE) if (out / name).exists()]
    if existing and not force:
        raise ExportError(f"--out {out}: would replace {', '.join(str(p) for p in existing)}; nothing was "
                          f"written (choose another --out, or --force to replace it)")


def export_checkpoint(source: str | Path, out: str | Path, fmt: str = "safetensors",
                      dtype: str | None = None, tokenizer: str | Path | None = None, log=print,
                      force: bool = False) -> Path:
    """Convert any checkpoint kind to `fmt` ('safetensors': one file; 'huginn': config.json +
    model.safetensors, plus tokenizer.json when the tokenizer is known)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format: unknown format {fmt!r}; choose one of {list(FORMATS)}")
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"--dtype: unknown dtype {dtype!r}; choose one of {list(DTYPES)}")
    _check_destination(Path(source), Path(out), fmt, force)
    loaded = load_checkpoint(source)
    if tokenizer:
        if not Path(tokenizer).is_file():
            raise ExportError(f"--tokenizer {tokenizer}: no such file")
        tokenizer = str(tokenizer)
    else:
        tokenizer, missing = loaded.tokenizer_or_none_with_reason()
        if tokenizer is None:
            where = (f"{out}/{TOKENIZER_FILE} is not written" if fmt == "huginn"
                     else "the file will name no tokenizer")
            log(f"[export] warning: {missing}: {where}; pass --tokenizer PATH to include it")
    torch_dtype = DTYPES[dtype] if dtype else None
    out = Path(out)
    if fmt == "safetensors":
        if out.suffix != ".safetensors":
            raise ExportError(f"--out: {out} should end in .safetensors")
        save_safetensors(loaded.model, out, loaded.run_config, loaded.step, str(loaded.path), tokenizer, torch_dtype)
    else:
        save_huginn(loaded.model, out, dtype=torch_dtype)
        if tokenizer:
            shutil.copyfile(tokenizer, out / TOKENIZER_FILE)
    counts = loaded.model.parameter_counts()
    log(f"[export] {loaded.kind} checkpoint {loaded.path}"
        + (f" (step {loaded.step})" if loaded.step is not None else "")
        + f": {counts['total']:,} parameters -> {out} ({fmt}"
        + (f", {dtype}" if dtype else "") + (", with its tokenizer" if tokenizer and fmt == "huginn" else "") + ")")
    return out


# ---- starting a run from existing weights -------------------------------------------------------------

SHAPE_FIELDS = ("padded_vocab_size", "hidden_size", "num_heads", "intermediate_size",
                "num_prelude_layers", "num_core_layers", "num_coda_layers", "qk_bias", "tie_embeddings",
                "block_type", "injection_type", "norm_type")


def load_initial_weights(model: RecurrentDepthModel, path: str | Path, log=print) -> LoadedCheckpoint:
    """Copy the weights of any checkpoint kind (e.g. the released Huginn weights) into `model`, in
    place, before deepspeed.initialize: the starting point of continued pretraining. The shapes must
    be the run's (`model.*` keys that change a tensor); depth settings such as mean_recurrence may
    differ and the run's own apply. Optimizer state and step start fresh."""
    where = f"checkpoint.init_from = {path}"
    try:
        loaded = load_checkpoint(path)
    except UserError as exc:
        raise ExportError(f"{where}: {exc}") from None
    source = loaded.model.config
    ours = model.config
    differ = [f"model.{k}: run has {getattr(ours, k)!r}, checkpoint has {getattr(source, k)!r}"
              for k in SHAPE_FIELDS if getattr(ours, k) != getattr(source, k)]
    if differ:
        raise ExportError(f"{where}: the checkpoint's shape differs from the run's:\n  " + "\n  ".join(differ))
    state = loaded.model.state_dict()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(state[name].to(tensor.dtype))
    log(f"[train] initial weights from {loaded.kind} checkpoint {loaded.path}"
        + (f" (step {loaded.step})" if loaded.step is not None else ""))
    return loaded
