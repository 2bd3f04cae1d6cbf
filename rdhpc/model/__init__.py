"""The recurrent-depth model. Imports torch only: no torch.distributed, no deepspeed."""

from rdhpc.model.config import MODEL_SIZES, ModelConfig, model_config_from_size
from rdhpc.model.huginn import CheckpointError, load_huginn, save_huginn
from rdhpc.model.recurrent_depth import IGNORE_INDEX, ModelOutput, RecurrentDepthModel
from rdhpc.model.sampling import DepthSampler

__all__ = [
    "MODEL_SIZES", "ModelConfig", "model_config_from_size", "RecurrentDepthModel", "ModelOutput",
    "IGNORE_INDEX", "DepthSampler", "load_huginn", "save_huginn", "CheckpointError",
]
