"""The user profile folders (``RANGEDISPATCH_PROFILE_PATH``, ``~/.config/rangedispatch``) for the
Hydra CLIs: ``hardware=NAME`` finds a tuned profile there, as ``load_config`` does."""

from __future__ import annotations

import sys
from typing import Callable


def with_user_profiles(hydra_main: Callable[[], None]) -> Callable[[], None]:
    """The console entry point: ``hydra_main`` with the user profile folders on Hydra's search path
    (unless the command line sets ``hydra.searchpath`` itself)."""

    def run() -> None:
        from rangedispatch.config.loader import hydra_searchpath_override

        extra = hydra_searchpath_override()
        if extra and not any(a.startswith("hydra.searchpath") for a in sys.argv[1:]):
            sys.argv.insert(1, extra)
        hydra_main()

    return run
