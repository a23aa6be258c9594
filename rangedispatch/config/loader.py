"""Compose the configuration with Hydra and validate it into ``RangeDispatchConfig``.

Only Hydra's public compose API is used. It keeps global state and refuses to run where a host
application (its own ``@hydra.main``) already set it, so ``compose_config`` sets the host's state
aside for the compose and puts it back.
"""

from __future__ import annotations

import contextlib
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
from rangedispatch.logs import warn_once

CONFIG_NAME = "config"
BASE_CONFIG_NAME = "rangedispatch_base"
PROFILE_PATH_ENV = "RANGEDISPATCH_PROFILE_PATH"


def user_profile_dirs() -> list[Path]:
    """Folders with user hardware profiles (``hardware/NAME.yaml``, the layout rangedispatch-tune
    writes), searched after the built-in ones (a built-in name wins, and the user file is reported) by
    ``load_config``, every CLI and ``hardware=auto``:
    ``$RANGEDISPATCH_PROFILE_PATH`` (folders separated by ``os.pathsep``), then the per-user
    ``$XDG_CONFIG_HOME/rangedispatch`` (default ``~/.config/rangedispatch``)."""
    dirs = [Path(p) for p in os.environ.get(PROFILE_PATH_ENV, "").split(os.pathsep) if p]
    dirs.append(Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "rangedispatch")
    return dirs


def _search_dirs(config_dirs: Sequence[Union[str, Path]]) -> list[Path]:
    """The extra folders, in search order, without user profiles that a built-in name hides (said once)."""
    dirs = [*map(Path, config_dirs), *user_profile_dirs()]
    builtin = _builtin_profiles()
    for d in dirs:
        for path in sorted((d / "hardware").glob("*.yaml")):
            if path.stem in builtin:
                warn_once(f"{path} is not used: the built-in profile {path.stem!r} has that name; rename the "
                          "file and its 'name:'")
    return dirs


def _builtin_profiles() -> set[str]:
    return {p.stem for p in (config_dir() / "hardware").glob("*.yaml")}


def hydra_searchpath_override() -> Optional[str]:
    """``hydra.searchpath=[...]`` for the user profile folders that exist (CLIs built on
    ``hydra.main`` find ``hardware=NAME`` there too), or None."""
    override = _searchpath_override(_search_dirs(()))
    return override[0] if override else None


def config_dir() -> Path:
    """The folder holding config.yaml: the package's ``conf`` (in a source checkout, a link to the
    repository's ``conf/``)."""
    return Path(__file__).resolve().parents[1] / "conf"


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
    """The composed ``DictConfig`` (no validation). ``config_dirs`` adds folders searched after the
    built-in one, e.g. one holding ``hardware/my_gpu.yaml`` written by ``rangedispatch-tune``;
    ``config_name`` picks a tool's config (``bench``, ``tune``) instead of the library's."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from yaml import YAMLError

    register_base_config()
    searchpath = _searchpath_override(_search_dirs(config_dirs))
    try:
        with _global_hydra_set_aside(), initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name, overrides=[*searchpath, *overrides])
    except (HydraException, YAMLError) as e:
        raise config_error(e, config_dirs) from None
    OmegaConf.set_struct(cfg, False)
    return cfg


def _searchpath_override(dirs: Sequence[Path]) -> list[str]:
    existing = [d for d in dirs if (d / "hardware").is_dir()]
    if not existing:
        return []
    return ["hydra.searchpath=[" + ",".join(f"file://{d.resolve()}" for d in existing) + "]"]


@contextlib.contextmanager
def _global_hydra_set_aside():
    """Hydra's compose API needs its global state unset; a host app under ``@hydra.main`` has it
    set. Clear it for our compose and give the host its state back."""
    from hydra.core.global_hydra import GlobalHydra

    host = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    GlobalHydra.instance().clear()
    try:
        yield
    finally:  # (initialize_config_dir swaps the singleton on exit: look it up again)
        GlobalHydra.instance().clear()
        if host is not None:
            GlobalHydra.instance().initialize(host)


def load_config(
    overrides: Optional[Union[str, Sequence[str]]] = None, config_dirs: Sequence[Union[str, Path]] = ()
) -> RangeDispatchConfig:
    """Compose ``conf/config.yaml`` with Hydra ``overrides`` (``["hardware=cpu",
    "dispatch.split_points=[8,32]"]``) and validate it. Raises ``ConfigError`` at load time, not when a
    value is first read. One override may be passed as a plain string."""
    if isinstance(overrides, str):
        overrides = [overrides]
    return to_schema(compose_config(overrides or (), config_dirs), config_dirs)


def load_profile(name: str, config_dirs: Sequence[Union[str, Path]] = ()) -> dict:
    """The hardware profile ``name`` as a plain mapping (the built-in one, then user folders)."""
    for d in [config_dir(), *_search_dirs(config_dirs)]:
        path = d / "hardware" / f"{name}.yaml"
        if path.is_file():
            return _read_profile(path)
    raise ConfigError(_unknown_profile(name, config_dirs))


def _read_profile(path: Path) -> dict:
    from omegaconf import OmegaConf
    from yaml import YAMLError

    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except YAMLError as e:
        raise config_error(e) from None


def _tuned_profiles(config_dirs: Sequence[Union[str, Path]]) -> dict[str, dict]:
    """The user profiles ``hardware=auto`` chooses among, by name. One whose file is broken is
    skipped with a warning: a bad file in a shared folder must not stop every other run."""
    builtin = _builtin_profiles()
    tuned: dict[str, dict] = {}
    for d in _search_dirs(config_dirs):
        for path in sorted((d / "hardware").glob("*.yaml")):
            if path.stem in builtin or path.stem in tuned:
                continue
            try:
                tuned[path.stem] = _read_profile(path)
            except ConfigError as e:
                warn_once(f"hardware=auto skips a broken profile: {e}")
    return tuned


def to_schema(cfg: Any, config_dirs: Sequence[Union[str, Path]] = (),
              world_size: Optional[int] = None) -> RangeDispatchConfig:
    """Validate a ``DictConfig``, plain mapping or ``RangeDispatchConfig`` into ``RangeDispatchConfig``;
    ``hardware: auto`` becomes the profile detected for this machine. ``world_size``: the ranks that
    will run it, when this process is not one of them (a CLI before it spawns them), for the choice
    of a tuned profile; by default this process's group or ``WORLD_SIZE``."""
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
        name = detect_profile(hardware_profiles(config_dirs), _tuned_profiles(config_dirs), world_size)
        cfg = {**cfg, "hardware": load_profile(name, config_dirs)}
    return build_dataclass(RangeDispatchConfig, cfg, "")


def config_error(e: Exception, config_dirs: Sequence[Union[str, Path]] = ()) -> ConfigError:
    """One line for what Hydra or YAML refused while reading a config: the file and line of broken
    YAML, the override that does not parse, the unknown profile or key and what exists instead."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from yaml import MarkedYAMLError

    if isinstance(e, MarkedYAMLError) and e.problem_mark is not None:
        return ConfigError(f"{e.problem_mark.name}, line {e.problem_mark.line + 1}: not valid YAML ({e.problem})")
    if isinstance(e, OverrideParseException):
        why = [line for line in e.message.splitlines() if not line.startswith(("Error parsing override", "See "))]
        return ConfigError(f"the override {e.override!r} does not parse: {'; '.join(why)} (the override grammar: "
                           "https://hydra.cc/docs/advanced/override_grammar/basic/)")
    if isinstance(e, MissingConfigException) and (e.missing_cfg_file or "").startswith("hardware/"):
        return ConfigError(_unknown_profile(e.missing_cfg_file.split("/", 1)[1], config_dirs))
    cause = e.__cause__
    full_key = getattr(cause, "full_key", None)
    if full_key and "not in struct" in str(cause):
        return ConfigError(_unknown_key(full_key, getattr(cause, "parent_node", None)))
    lines = [line.strip() for line in str(e).split("Config search path")[0].splitlines() if line.strip()]
    return ConfigError("; ".join(lines))


def _unknown_profile(name: str, config_dirs: Sequence[Union[str, Path]]) -> str:
    return (f"hardware={name!r} is not a known hardware profile; available: auto (detect this machine's), "
            f"{', '.join(hardware_profiles(config_dirs))}")


def _unknown_key(full_key: str, parent_node: Any) -> str:
    """Hydra says 'Key 'foo' is not in struct' for a typo; say which keys exist there: the schema's
    (where it knows the section), else those of the tool's section as composed."""
    from rangedispatch.config.build import _field_names, schema_at

    parent, _, name = full_key.rpartition(".")
    section = schema_at(RangeDispatchConfig, parent)
    allowed = _field_names(section) if section else list(parent_node or ())
    if section and name in allowed:  # a schema key the profile's YAML leaves at its default: Hydra needs '+'
        return (f"{full_key} is not set in the selected config (it defaults to "
                f"{getattr(section(), name)!r}); to set it, add it: '+{full_key}=...'")
    return f"unknown key {full_key!r}; allowed keys under {parent or 'the root'}: {', '.join(allowed)}"
