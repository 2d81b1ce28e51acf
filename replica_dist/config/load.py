"""`load_config`: command-line overrides to the checked Config and the run directory."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from replica_dist.config.memory import _check_memory
from replica_dist.config.overrides import (
    _check_applies,
    _check_known_keys,
    _check_length_set_once,
    _check_numbers,
    _check_override_values,
    _check_unknown_override,
    _one_line,
    _parse_overrides,
    _schema,
)
from replica_dist.config.run import Config, register_configs
from replica_dist.config.user_targets import (
    _check_coupling_target,
    _check_model_target,
    _check_target_extras,
    _route_target_arguments,
)
from replica_dist.data_names import VISION_DATA
from replica_dist.errors import ConfigError

# An installed wheel carries the configs inside the package (pyproject maps replica_dist.conf to
# conf/); a checkout, run in place or installed editable, keeps them at its top level.
_PACKAGED_CONF = Path(__file__).resolve().parent.parent / "conf"
CONF_DIR = (
    _PACKAGED_CONF if (_PACKAGED_CONF / "config.yaml").is_file() else _PACKAGED_CONF.parent.parent / "conf"
)


def load_config(overrides: list[str]) -> tuple[Config, Path]:
    """The validated config and the run directory, from command-line overrides.

    Beyond Hydra's own checks (types, unknown group options) and each dataclass's
    `__post_init__` (ranges), every problem below is one ConfigError naming the key or the
    override: an override that does not parse; a key that `+`/`++` adds outside the schema;
    a bool given anything but true or false; a non-finite float or an integer beyond int64;
    a key set for a group option that ignores it (APPLIES_TO); a model._target_ (or
    coupling._target_) that does not import, takes other arguments or comes with preset keys; sizes whose dataset or model
    cannot fit in this machine's memory."""
    register_configs()
    schema = _schema()
    parsed = _parse_overrides(overrides)
    _check_override_values(parsed, schema)
    routed, typed = _route_target_arguments(parsed)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="train"):
            dict_cfg = compose("config", overrides=routed, return_hydra_config=True)
        run_dir = Path(dict_cfg.hydra.run.dir)
        with open_dict(dict_cfg):
            del dict_cfg["hydra"]
        container = OmegaConf.to_container(dict_cfg, resolve=False)
        _check_known_keys(container, Config)
        _check_target_extras(container, typed)
        cfg = OmegaConf.to_object(dict_cfg)
    except ConfigError:
        raise
    except (HydraException, OmegaConfBaseException) as err:
        _check_unknown_override(str(err))
        raise ConfigError(_one_line(err)) from None
    except (ValueError, TypeError) as err:  # Hydra's own, for overrides its grammar lets through
        raise ConfigError(f"cannot apply overrides {' '.join(overrides)!r}: {_one_line(err)}") from None
    _check_numbers(cfg)
    _check_model_target(cfg, parsed)  # first: with a target, every preset key is the problem
    _check_coupling_target(cfg, parsed)
    _check_applies(cfg, parsed)
    _check_length_set_once(cfg, parsed)
    _check_memory(cfg)
    if cfg.data.name in VISION_DATA:  # torchvision and the root's layout, before anything is written
        from replica_dist.vision import check_root

        check_root(cfg.data)
    return cfg, run_dir
