"""Read and write the released Huginn checkpoint layout: `config.json` + `model.safetensors`.

A model trained here loads where the released model loads (its config names every field the
released code reads), and the released weights load here as a starting point. Weights are read
with safetensors only: nothing is ever unpickled.

Our module names differ from the released ones only at the top level and in `Wqkv`; the tensor
layouts are identical ([q; k; v] rows, [gate; up] rows, adapter input [state ; e], qk_bias (2, 1, H, D)).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rdhpc.errors import UserError
from rdhpc.model.config import ModelConfig
from rdhpc.model.recurrent_depth import RecurrentDepthModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# our name -> released name (regex on the parameter path)
_RENAMES = [
    (r"^embedding\.weight$", "transformer.wte.weight"),
    (r"^prelude\.(\d+)\.", r"transformer.prelude.\1."),
    (r"^core\.(\d+)\.", r"transformer.core_block.\1."),
    (r"^coda\.(\d+)\.", r"transformer.coda.\1."),
    (r"^adapter\.weight$", "transformer.adapter.weight"),
    (r"^final_norm\.weight$", "transformer.ln_f.weight"),
    (r"^lm_head\.weight$", "lm_head.weight"),
]
_BLOCK_RENAMES = [(r"\.attn\.qkv\.weight$", ".attn.Wqkv.weight")]

# Variant names of this project <-> the released config's class names.
_RELEASED_NAMES = {
    "block_type": ("block_class_name", {"sandwich": "SandwichBlock", "prenorm": "TransformerPreNormBlock"}),
    "norm_type": ("norm_class_name", {"rmsnorm": "RMSNorm_llama", "rmsnorm-parameter-free": "RMSNorm_noweight"}),
    "sampling_scheme": ("sampling_scheme", {"poisson-lognormal": "poisson-lognormal-filling", "fixed": "fixed"}),
}
# Other spellings seen for the same thing when reading.
_READ_ALIASES = {"RMSNorm": "rmsnorm", "poisson-lognormal": "poisson-lognormal"}


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read as what it claims to be; the message names the file."""


def released_name(name: str) -> str:
    for pattern, replacement in _RENAMES + _BLOCK_RENAMES:
        name = re.sub(pattern, replacement, name)
    return name


def released_config(config: ModelConfig, dtype: torch.dtype) -> dict:
    """Every field the released config.json has, so the released code can load what we write."""
    out = {
        "model_type": "huginn_raven",
        "architectures": ["RavenForCausalLM"],
        "auto_map": {"AutoConfig": "raven_config_minimal.RavenConfig",
                     "AutoModelForCausalLM": "raven_modeling_minimal.RavenForCausalLM"},
        "n_embd": config.hidden_size,
        "n_heads": config.num_heads,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_heads,
        "head_dim": config.head_dim,
        "n_layers": config.num_stored_layers,
        "block_size": config.max_seq_len,
        "vocab_size": config.padded_vocab_size,
        "padding_multiple": config.padding_multiple,
        "tie_embeddings": config.tie_embeddings,
        "intermediate_size": config.intermediate_size,
        "bias": False,
        "norm_eps": config.norm_eps,
        "n_layers_in_prelude": config.num_prelude_layers,
        "n_layers_in_recurrent_block": config.num_core_layers,
        "n_layers_in_coda": config.num_coda_layers,
        "mean_recurrence": config.mean_recurrence,
        "mean_backprop_depth": config.mean_backprop_depth,
        "effective_expected_depth": config.effective_depth,
        "qk_bias": config.qk_bias,
        "rope_base": config.rope_base,
        "injection_type": config.injection_type,
        "mlp_class_name": "GatedMLP",
        "nonlin_name": "SiLU",
        "state_init": "like-init",
        "init_strategy": config.init_strategy,
        "torch_dtype": str(dtype).removeprefix("torch."),
        # rdhpc-only: what the released names cannot say (ignored by the released code).
        "rdhpc": {"vocab_size": config.vocab_size, "recurrence_sigma": config.recurrence_sigma,
                  "size": config.size},
    }
    for ours, (theirs, table) in _RELEASED_NAMES.items():
        out[theirs] = table[getattr(config, ours)]
    return out


def config_from_released(raw: dict, source: str = CONFIG_FILE) -> ModelConfig:
    """Read every shape from the released fields; derived fields such as head_dim are not trusted.
    Weights load in float32 unless `dtype` is given to load_huginn."""
    def need(*names):
        for name in names:
            if name in raw:
                return raw[name]
        raise CheckpointError(f"{source}: missing field {names[0]!r}")

    if raw.get("model_type", "huginn_raven") != "huginn_raven":
        raise CheckpointError(f"{source}: model_type is {raw.get('model_type')!r}, expected 'huginn_raven'")
    extra = raw.get("rdhpc", {})
    padded_vocab = need("vocab_size", "padded_vocab_size")
    kwargs = dict(
        hidden_size=need("n_embd"),
        num_heads=need("n_heads", "num_attention_heads"),
        intermediate_size=need("intermediate_size"),
        num_prelude_layers=need("n_layers_in_prelude"),
        num_core_layers=need("n_layers_in_recurrent_block"),
        num_coda_layers=need("n_layers_in_coda"),
        max_seq_len=need("block_size"),
        vocab_size=extra.get("vocab_size", padded_vocab),
        padding_multiple=raw.get("padding_multiple", 4096) or 1,
        mean_recurrence=raw.get("mean_recurrence", 32),
        mean_backprop_depth=raw.get("mean_backprop_depth", 8),
        recurrence_sigma=extra.get("recurrence_sigma", 0.5),
        rope_base=raw.get("rope_base", 50000.0),
        norm_eps=raw.get("norm_eps", 1e-6),
        qk_bias=raw.get("qk_bias", True),
        tie_embeddings=raw.get("tie_embeddings", True),
        injection_type=raw.get("injection_type", "linear"),
        init_strategy=raw.get("init_strategy", "takase"),
        size=extra.get("size"),
    )
    if kwargs["num_heads"] != raw.get("num_key_value_heads", kwargs["num_heads"]):
        raise CheckpointError(f"{source}: grouped key/value heads are not part of this design "
                              f"(n_heads {kwargs['num_heads']}, num_key_value_heads {raw['num_key_value_heads']})")
    for ours, (theirs, table) in _RELEASED_NAMES.items():
        if theirs in raw:
            reverse = {v: k for k, v in table.items()} | _READ_ALIASES
            if raw[theirs] not in reverse:
                raise CheckpointError(f"{source}: {theirs} = {raw[theirs]!r} is not supported; "
                                      f"known: {sorted(table.values())}")
            kwargs[ours] = reverse[raw[theirs]]
    config = ModelConfig(**kwargs)
    if config.padded_vocab_size != padded_vocab:
        raise CheckpointError(f"{source}: vocab_size {padded_vocab} is not a multiple of padding_multiple "
                              f"{config.padding_multiple}")
    problems = config.problems()
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
    return config


def _umask() -> int:
    """The process's umask, read without changing it (os.umask sets it, racing other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def write_safetensors(tensors: dict, path: Path, metadata: dict) -> Path:
    """safetensors' save_file through a temporary name, then the mode any new file gets (0666 less
    the umask): save_file creates its file 0600, which others on a shared project space cannot read."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o666 & ~_umask())
    tmp.replace(path)
    return path


def save_huginn(model: RecurrentDepthModel, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write `path/config.json` and `path/model.safetensors` in the released layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = dtype or next(model.parameters()).dtype
    tensors = {released_name(name): t.detach().to(dtype).contiguous().cpu()
               for name, t in model.state_dict().items()}
    # The released file omits lm_head.weight when it is tied; so do we.
    write_safetensors(tensors, path / WEIGHTS_FILE, {"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(released_config(model.config, dtype), indent=2) + "\n")
    return path


def load_huginn(path: str | Path, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None) -> RecurrentDepthModel:
    """Build the model described by `path/config.json` and load `path/model.safetensors` into it.

    Every tensor the model needs must be present with the right shape; unknown tensors are an
    error (a different architecture, not something to ignore). `freqs_cis` is recomputed.
    """
    path = Path(path)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for required in (config_path, weights_path):
        if not required.is_file():
            raise CheckpointError(f"{required}: not found (expected the released layout: "
                                  f"{CONFIG_FILE} + {WEIGHTS_FILE})")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from None
    config = config_from_released(raw, str(config_path))

    with torch.device("meta"):
        model = RecurrentDepthModel(config)
    expected = {released_name(n): (n, t) for n, t in model.state_dict().items()}
    state = {}
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as f:
            stored = set(f.keys())
            for name in sorted(stored):
                if name == "freqs_cis" or name.endswith(".freqs_cis"):
                    continue
                if name == "lm_head.weight" and config.tie_embeddings:
                    continue  # checked against wte below
                if name not in expected:
                    raise CheckpointError(f"{weights_path}: unexpected tensor {name!r} for this config")
                ours, ref = expected[name]
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != tuple(ref.shape):
                    raise CheckpointError(f"{weights_path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                          f"config.json implies {tuple(ref.shape)}")
                state[ours] = tensor
            if config.tie_embeddings and "lm_head.weight" in stored:
                if not torch.equal(f.get_tensor("lm_head.weight"), state.get("embedding.weight", torch.empty(0))):
                    raise CheckpointError(f"{weights_path}: lm_head.weight differs from transformer.wte.weight "
                                          "but config.json says tie_embeddings")
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{weights_path}: cannot read ({exc})") from None
    missing = sorted(set(expected) - {released_name(n) for n in state})
    if missing:
        raise CheckpointError(f"{weights_path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")

    model = model.to_empty(device=device)
    model.load_state_dict(state, strict=True)
    if dtype is not None:
        model = model.to(dtype)
    return model
