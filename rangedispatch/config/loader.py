"""Compose the configuration with Hydra and validate it into ``RangeDispatchConfig``.

Hydra's ``initialize``/``compose`` keep global state and refuse to run inside a host application that
already initialized Hydra; clearing the host's state would break it. So the library drives Hydra's
config loader directly: same config files, same override grammar, no global state touched.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from rangedispatch.config.build import build_dataclass
from rangedispatch.config.schema import (
    CompileConfig,
    DispatchConfig,
    FusionConfig,
    RangeDispatchConfig,
)
from rangedispatch.errors import ConfigError

CONFIG_NAME = "config"
BASE_CONFIG_NAME = "rangedispatch_base"
PROFILE_PATH_ENV = "RANGEDISPATCH_PROFILE_PATH"


def user_profile_dirs() -> list[Path]:
    """Folders with user hardware profiles (``hardware/NAME.yaml``, the layout rangedispatch-tune
    writes), searched before the built-in ones by ``load_config``, every CLI and ``hardware=auto``:
    ``$RANGEDISPATCH_PROFILE_PATH`` (folders separated by ``os.pathsep``), then the per-user
    ``$XDG_CONFIG_HOME/rangedispatch`` (default ``~/.config/rangedispatch``)."""
    dirs = [Path(p) for p in os.environ.get(PROFILE_PATH_ENV, "").split(os.pathsep) if p]
    dirs.append(Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "rangedispatch")
    return dirs


def _search_dirs(config_dirs: Sequence[Union[str, Path]]) -> list[Path]:
    return [*map(Path, config_dirs), *user_profile_dirs()]


def hydra_searchpath_override() -> Optional[str]:
    """``hydra.searchpath=[...]`` for the user profile folders that exist (CLIs built on
    ``hydra.main`` find ``hardware=NAME`` there too), or None."""
    dirs = [d for d in user_profile_dirs() if (d / "hardware").is_dir()]
    if not dirs:
        return None
    return "hydra.searchpath=[" + ",".join(f"file://{d.resolve()}" for d in dirs) + "]"


def config_dir() -> Path:
    """The folder holding config.yaml: shipped inside the package when installed from a wheel
    (``rangedispatch/conf``), the repository's ``conf/`` in a source checkout."""
    packaged = Path(__file__).resolve().parents[1] / "conf"
    if (packaged / f"{CONFIG_NAME}.yaml").is_file():
        return packaged
    source = Path(__file__).resolve().parents[2] / "conf"
    if (source / f"{CONFIG_NAME}.yaml").is_file():
        return source
    raise FileNotFoundError(f"rangedispatch config files not found in {packaged} nor {source}")


def hardware_profiles(extra_dirs: Sequence[Union[str, Path]] = ()) -> list[str]:
    names = set()
    for d in [config_dir(), *_search_dirs(extra_dirs)]:
        names.update(p.stem for p in (d / "hardware").glob("*.yaml"))
    names.discard("auto")
    return sorted(names)


def register_base_config() -> None:
    """Register the schema defaults (minus the hardware profile, which comes from its group) as the
    base node config.yaml builds on: the dataclasses stay the one source of every default, and every
    schema key can be overridden from the command line without a '+'."""
    from hydra.core.config_store import ConfigStore

    base = {
        "dispatch": dataclasses.asdict(DispatchConfig()),
        "compile": dataclasses.asdict(CompileConfig()),
        "fusion": dataclasses.asdict(FusionConfig()),
    }
    ConfigStore.instance().store(name=BASE_CONFIG_NAME, node=base)


def compose_config(overrides: Sequence[str] = (), config_dirs: Sequence[Union[str, Path]] = (),
                   config_name: str = CONFIG_NAME) -> Any:
    """The composed ``DictConfig`` (no validation). ``config_dirs`` adds folders searched before the
    built-in ones, e.g. one holding ``hardware/my_gpu.yaml`` written by ``rangedispatch-tune``;
    ``config_name`` picks a tool's config (``bench``, ``tune``) instead of the library's."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.errors import HydraException, MissingConfigException
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    register_base_config()
    search_path = create_config_search_path(f"file://{config_dir()}")
    for d in reversed(_search_dirs(config_dirs)):
        search_path.prepend("rangedispatch-user", f"file://{os.path.abspath(d)}")
    loader = ConfigLoaderImpl(config_search_path=search_path)
    try:
        cfg = loader.load_configuration(
            config_name=config_name, overrides=list(overrides), run_mode=RunMode.RUN, from_shell=False
        )
    except MissingConfigException as e:
        if "hardware" in str(e):
            wanted = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == "hardware"), "?")
            raise ConfigError(
                f"hardware={wanted!r} is not a known hardware profile; available: "
                f"{', '.join(hardware_profiles(config_dirs))}"
            ) from None
        raise ConfigError(str(e)) from None
    except HydraException as e:
        raise ConfigError(_explain_hydra_error(e)) from None
    with open_dict(cfg):
        cfg.pop("hydra", None)
    OmegaConf.set_struct(cfg, False)
    return cfg


def load_config(
    overrides: Optional[Sequence[str]] = None, config_dirs: Sequence[Union[str, Path]] = ()
) -> RangeDispatchConfig:
    """Compose ``conf/config.yaml`` with Hydra ``overrides`` (``["hardware=cpu",
    "dispatch.split_points=[8,32]"]``) and validate it. Raises ``ConfigError`` at load time, not when a
    value is first read."""
    return to_schema(compose_config(overrides or (), config_dirs), config_dirs)


def load_profile(name: str, config_dirs: Sequence[Union[str, Path]] = ()) -> dict:
    """The hardware profile ``name`` as a plain mapping (user folders first, then the built-in one)."""
    from omegaconf import OmegaConf

    for d in [*_search_dirs(config_dirs), config_dir()]:
        path = d / "hardware" / f"{name}.yaml"
        if path.is_file():
            return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    raise ConfigError(f"hardware={name!r} is not a known hardware profile; available: "
                      f"{', '.join(hardware_profiles(config_dirs))}")


def to_schema(cfg: Any, config_dirs: Sequence[Union[str, Path]] = ()) -> RangeDispatchConfig:
    """Validate a ``DictConfig``, plain mapping or ``RangeDispatchConfig`` into ``RangeDispatchConfig``;
    ``hardware: auto`` becomes the profile detected for this machine."""
    if isinstance(cfg, RangeDispatchConfig):
        return cfg
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(cfg, DictConfig):
        try:
            cfg = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{getattr(e, 'full_key', '') or 'config'}: {e.msg if hasattr(e, 'msg') else e}") from None
    if "hardware" not in cfg:
        raise ConfigError("hardware is required: select a profile, e.g. hardware=cpu; available: "
                          + ", ".join(hardware_profiles()))
    if isinstance(cfg["hardware"], dict) and cfg["hardware"].get("name") == "auto":
        from rangedispatch.config.detect import detect_profile

        extra = sorted(set(cfg["hardware"]) - {"name"})
        if extra:
            raise ConfigError(f"hardware=auto takes no other hardware keys (got {', '.join('hardware.' + k for k in extra)}); "
                              "name the profile to override its values, e.g. hardware=h100")
        tuned = {name: load_profile(name, config_dirs) for d in _search_dirs(config_dirs)
                 for name in (p.stem for p in sorted((d / "hardware").glob("*.yaml")))}
        cfg = {**cfg, "hardware": load_profile(detect_profile(hardware_profiles(config_dirs), tuned), config_dirs)}
    return build_dataclass(RangeDispatchConfig, cfg, "")


def _explain_hydra_error(e: Exception) -> str:
    """Hydra says 'Key 'foo' is not in struct' for a typo; add which keys exist there."""
    text = str(e)
    cause = e.__cause__
    full_key = getattr(cause, "full_key", None)
    if full_key and "not in struct" in str(cause):
        from rangedispatch.config.build import _field_names, schema_at

        parent, _, name = full_key.rpartition(".")
        section = schema_at(RangeDispatchConfig, parent)
        allowed = _field_names(section) if section else []
        if name in allowed:  # a schema key the profile's YAML leaves at its default: Hydra needs '+'
            return (f"{full_key} is not set in the selected config (it defaults to "
                    f"{getattr(section(), name)!r}); to set it, add it: '+{full_key}=...'")
        return f"unknown key {full_key!r}; allowed keys under {parent or 'the root'}: {', '.join(allowed)}"
    return text
