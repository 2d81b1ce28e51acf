"""Typed configuration: dataclasses registered with Hydra's ConfigStore.

Hydra checks types and unknown keys; `__post_init__` checks ranges. Library code receives
these dataclasses (built once with `OmegaConf.to_object`), never a DictConfig.

The package, by concern: `checks` (the range check, the choice types), the schema
in `model_data` (model.*, data.*), `coupling` (coupling.*), `fault_tolerance` (ft.*), `training` (optim.*, train.*, log.*,
eval.*, guard.*, checkpoint.*, flatness.*) and `run` (dist.*, parallel.*, Config); `overrides`
(the command line's checks, APPLIES_TO), `user_targets` (the checks of a model._target_ or coupling._target_),
`memory` (sizes that cannot fit), `load` (load_config, CONF_DIR) and `help` (help_text). The
names below are the ones callers import from `replica_dist.config` (ConfigError's home is
replica_dist.errors, locate_target's replica_dist.targets).
"""

from __future__ import annotations

from replica_dist.config.checks import CHOICES
from replica_dist.config.coupling import DEFAULT_ETA_FINAL, CouplingConfig
from replica_dist.config.fault_tolerance import FtConfig
from replica_dist.config.help import help_text
from replica_dist.config.load import CONF_DIR, load_config
from replica_dist.config.memory import generated_data_bytes, parameter_count
from replica_dist.config.model_data import (
    MODEL_PRESET_KEYS,
    DataConfig,
    ModelConfig,
)
from replica_dist.config.overrides import APPLIES_TO
from replica_dist.config.run import (
    BUCKET_MAX_MB,
    COMPRESSIONS,
    TIMEOUT_MAX_S,
    Config,
    DistConfig,
    ParallelConfig,
    check_compression,
    register_configs,
)
from replica_dist.config.training import (
    RESUMABLE_KEYS,
    CheckpointConfig,
    EvalConfig,
    FlatnessConfig,
    GuardConfig,
    LogConfig,
    OptimConfig,
    TrainConfig,
    may_change_on_resume,
)
from replica_dist.data_names import VISION_DATA
from replica_dist.errors import ConfigError
from replica_dist.targets import MODEL_DATA_ARGUMENTS, locate_target, model_signature

__all__ = [
    "APPLIES_TO",
    "BUCKET_MAX_MB",
    "CHOICES",
    "COMPRESSIONS",
    "CONF_DIR",
    "DEFAULT_ETA_FINAL",
    "MODEL_DATA_ARGUMENTS",
    "MODEL_PRESET_KEYS",
    "RESUMABLE_KEYS",
    "TIMEOUT_MAX_S",
    "VISION_DATA",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "CouplingConfig",
    "DataConfig",
    "DistConfig",
    "EvalConfig",
    "FlatnessConfig",
    "FtConfig",
    "GuardConfig",
    "LogConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "TrainConfig",
    "check_compression",
    "generated_data_bytes",
    "help_text",
    "load_config",
    "locate_target",
    "may_change_on_resume",
    "model_signature",
    "parameter_count",
    "register_configs",
]
