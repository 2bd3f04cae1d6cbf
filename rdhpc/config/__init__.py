"""Typed run configuration: sections in schema.py, YAML loading and validation in loader.py."""

from rdhpc.config.loader import (ConfigError, config_from_checkpoint, config_from_dict, config_to_dict,
                                 config_to_yaml, load_config, save_config)
from rdhpc.config.schema import (SECTION_NAMES, CheckpointConfig, DataConfig, EvalConfig, LoggingConfig, OptimConfig,
                                 RunConfig, ScheduleConfig, SlurmConfig, TrainConfig, ZeroConfig)
from rdhpc.model.config import MODEL_SIZES, ModelConfig

__all__ = [
    "ConfigError", "load_config", "config_from_dict", "config_from_checkpoint", "config_to_dict", "config_to_yaml",
    "save_config", "RunConfig", "ModelConfig", "DataConfig", "OptimConfig", "ScheduleConfig", "TrainConfig",
    "EvalConfig", "ZeroConfig", "CheckpointConfig", "LoggingConfig", "SlurmConfig", "SECTION_NAMES", "MODEL_SIZES",
]
