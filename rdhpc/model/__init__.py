"""The recurrent-depth model. Imports torch only: no torch.distributed, no deepspeed.

Names are loaded on first use (PEP 562), so `rdhpc.model.config` (shapes, sizes) and the commands
that only need it, such as data preparation, never pay for importing torch.
"""

import importlib

_EXPORTS = {
    "MODEL_SIZES": "rdhpc.model.config", "ModelConfig": "rdhpc.model.config",
    "model_config_from_size": "rdhpc.model.config",
    "RecurrentDepthModel": "rdhpc.model.recurrent_depth", "ModelOutput": "rdhpc.model.recurrent_depth",
    "IGNORE_INDEX": "rdhpc.model.recurrent_depth",
    "DepthSampler": "rdhpc.model.sampling",
    "load_huginn": "rdhpc.model.huginn", "save_huginn": "rdhpc.model.huginn",
    "CheckpointError": "rdhpc.model.huginn",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rdhpc.model' has no attribute {name!r}")
