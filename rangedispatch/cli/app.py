"""How every rangedispatch CLI runs. Hydra parses the command line, composes the tool's config and
answers ``--help`` (with the tool's text), ``--hydra-help``, ``--info`` and ``--cfg hydra|all``.
Around it, rangedispatch adds:

- the config is validated before anything starts, and the tool gets it resolved (``hardware=auto``
  replaced by the detected profile, the tool's section as it will run): spawned ranks need not
  detect again, and ``--cfg job`` (``-c job``) prints exactly that config;
- a user error (a bad value or ``RANGEDISPATCH_LOGS``, a typo'd key, an override that does not
  parse, an unknown profile, broken YAML) prints one line and exits 2;
- user profile folders join Hydra's search path.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable, Optional

from rangedispatch.errors import RangeDispatchError


def hydra_app(main: Callable[[Any], None], config_name: str, validate: Callable[[Any], tuple],
              about: str, section: Optional[type] = None) -> Callable[[], None]:
    """The console entry point of a tool. ``main(cfg)`` runs it on the resolved config (a function
    decorated with ``hydra.main`` works too: Hydra passes a given ``cfg`` straight through).
    ``validate(cfg)`` returns the validated config dataclasses (library config first), raising
    ``RangeDispatchError`` on bad input. ``section``: the tool's own config dataclass (``bench:``,
    ``tune:``), whose defaults its YAML builds on. ``about``: the ``--help`` text."""
    prog = "rangedispatch-" + ("demo" if config_name == "config" else config_name)

    def task(cfg: Any, show_config: bool) -> None:
        from omegaconf import OmegaConf

        try:
            resolved: dict = {}
            for c in validate(cfg):
                resolved.update({c.SECTION: dataclasses.asdict(c)} if hasattr(c, "SECTION") else dataclasses.asdict(c))
            if show_config:
                print(OmegaConf.to_yaml(resolved), end="")
            else:
                main(OmegaConf.create(resolved))
        except RangeDispatchError as e:  # exits here: past Hydra, the error would print a second line
            _fail(prog, e)

    def run() -> None:
        import hydra
        from hydra.core.config_store import ConfigStore
        from hydra.errors import HydraException
        from yaml import YAMLError

        from rangedispatch import logs
        from rangedispatch.cli._common import register_section
        from rangedispatch.config.loader import config_dir, config_error, hydra_searchpath_override, register_base_config

        register_base_config()
        if section is not None:
            register_section(section)
        ConfigStore.instance().store(group="hydra/help", name=prog,
                                     node={"app_name": prog, "header": "", "footer": "", "template": about})
        args = sys.argv[1:]
        show_config = _take_cfg_job(args)
        extra = hydra_searchpath_override()
        if extra and not any(a.startswith("hydra.searchpath") for a in args):
            args.insert(0, extra)
        # --cfg job: stdout holds the YAML alone; warnings still reach stderr (Python's last resort)
        quiet = ["hydra/job_logging=none", "hydra/hydra_logging=none"] if show_config else []
        sys.argv[1:] = [f"hydra/help={prog}", *quiet, *args]
        os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing: the one-line report is ours
        try:
            logs.configure_from_env()  # a bad value fails here, before any rank starts
            hydra.main(config_path=str(config_dir()), config_name=config_name, version_base="1.3")(
                lambda cfg: task(cfg, show_config))()
        except RangeDispatchError as e:
            _fail(prog, e)
        except (HydraException, YAMLError) as e:
            _fail(prog, config_error(e))

    return run


def _take_cfg_job(args: list[str]) -> bool:
    """Remove ``--cfg job`` (``-c job``, ``--cfg=job``) from ``args``: the resolved config is printed
    instead of Hydra's composed one. Whether it was there."""
    for i, arg in enumerate(args):
        if arg == "--cfg=job":
            del args[i]
            return True
        if arg in ("--cfg", "-c") and args[i + 1:i + 2] == ["job"]:
            del args[i:i + 2]
            return True
    return False


def _fail(prog: str, error: Exception) -> None:
    print(f"{prog}: {error}", file=sys.stderr)
    sys.exit(2)
