"""Typed run configurations: dataclasses loadable from YAML and overridable from the command line.

Every training method has one dataclass. Fields shared by all methods live in ``TrainConfig``; a method's
config adds its own. The CLI builds its flags from these fields (``--micro-batch-size`` for
``micro_batch_size``), so a field documented here is a flag, a YAML key and a Python argument at once.

The package is split by what is configured, so that adding a method or a tool touches one module and never
the shared machinery: ``loading`` knows no config class (checks, YAML/flag values -> typed fields, --help
docs), ``training`` holds the training methods, ``tools`` the generate/label/score/data inspect commands.
Everything is re-exported here, so ``from prefopt.config import ...`` is the one import path. None of it imports
torch.
"""

from dataclasses import field

from .loading import (
    DTYPES,
    check_field,
    check_length_limits,
    check_required,
    check_reward_fn,
    coerce,
    field_docs,
    field_types,
    from_dict,
    load_config,
    save_config,
    to_dict,
    unwrap_optional,
)
from .tools import DEVICES_HELP, EvalConfig, GenerateConfig, InspectConfig, LabelConfig, ScoreConfig
from .training import OPTIMIZERS, DPOConfig, KTOConfig, PPOConfig, RMConfig, SFTConfig, TrainConfig

__all__ = ["TrainConfig", "DPOConfig", "KTOConfig", "SFTConfig", "RMConfig", "PPOConfig",
           "GenerateConfig", "LabelConfig", "ScoreConfig", "InspectConfig", "EvalConfig",
           "load_config", "from_dict", "save_config", "to_dict", "coerce", "field_types", "field_docs",
           "unwrap_optional", "check_field", "check_length_limits", "check_required", "check_reward_fn",
           "OPTIMIZERS", "DTYPES", "DEVICES_HELP", "field"]
