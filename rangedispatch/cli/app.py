"""What every rangedispatch CLI does before Hydra runs it: ``--help`` describes the tool, bad values
and typo'd keys print one line and exit 2, ``--cfg job`` prints the config that will actually be
used (the detected hardware profile, not ``auto``), and user profile folders join Hydra's search
path. The tools stay Hydra apps (same override grammar, same config files)."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Optional

from rangedispatch.errors import RangeDispatchError


def hydra_app(hydra_main: Callable[[], None], config_name: str, validate: Callable[[Any], tuple],
              about: str, section: Optional[type] = None) -> Callable[[], None]:
    """The console entry point of a Hydra app. ``validate(composed)`` returns the validated config
    dataclasses (library config first), raising ``RangeDispatchError`` on bad input. ``section``:
    the tool's own config dataclass (``bench:``, ``tune:``), whose defaults its YAML builds on."""

    def run() -> None:
        from omegaconf import OmegaConf

        from rangedispatch.cli._common import register_section
        from rangedispatch.config.loader import compose_config, hydra_searchpath_override, register_base_config

        register_base_config()
        if section is not None:
            register_section(section)

        prog = config_name if config_name != "config" else "demo"
        args = sys.argv[1:]
        if "--help" in args or "-h" in args:
            print(about.strip())
            return
        overrides = [a for a in args if not a.startswith("-") and "=" in a and not a.startswith("hydra.")]
        try:
            configs = validate(compose_config(overrides, config_name=config_name))
        except RangeDispatchError as e:
            print(f"rangedispatch-{prog}: {e}", file=sys.stderr)
            sys.exit(2)
        if "--cfg" in args:
            merged: dict = {}
            for c in configs:
                merged.update(dataclasses.asdict(c) if not hasattr(c, "SECTION") else {c.SECTION: dataclasses.asdict(c)})
            print(OmegaConf.to_yaml(merged), end="")
            return
        extra = hydra_searchpath_override()
        if extra and not any(a.startswith("hydra.searchpath") for a in args):
            sys.argv.insert(1, extra)
        hydra_main()

    return run
