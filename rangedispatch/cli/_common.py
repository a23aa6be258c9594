"""What the CLIs share: their own config section next to the library's, and a progress bar."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf


def register_section(cls: type) -> None:
    """Store ``cls``'s defaults as the base node ``rangedispatch_<section>_base`` that the tool's YAML
    builds on: the dataclass stays the one source of its defaults, and every key can be overridden
    from the command line without a '+'."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=f"rangedispatch_{cls.SECTION}_base", node={cls.SECTION: dataclasses.asdict(cls())})


def split_config(cfg: Any, cls: type, as_run: Callable[[Any], Any] = lambda section: section) -> tuple:
    """``(RangeDispatchConfig, cls instance)`` from a composed tool config; both validated.
    ``as_run(section)``: the section as the run will use it, taken before ``hardware=auto`` is
    detected (a CPU smoke run hides the GPUs first). Detection counts the section's
    ``world_size`` ranks, unless this process already is one of them (torchrun)."""
    from rangedispatch.config import to_schema
    from rangedispatch.config.build import build_dataclass

    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    section = as_run(build_dataclass(cls, data.pop(cls.SECTION, {}), cls.SECTION))
    world_size = None if "WORLD_SIZE" in os.environ else section.world_size
    return to_schema(data, world_size=world_size), section


def progress(total: int, rank: int, desc: str) -> Callable[[], None]:
    """One step of a tqdm bar (ETA included) on rank 0; nothing on the other ranks. While the bar
    is open, log lines print above it rather than into it."""
    if rank != 0:
        return lambda: None
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    open_bar = contextlib.ExitStack()
    # the loggers that print (the library's own only under RANGEDISPATCH_LOGS; else it reaches the root's)
    printing = [log for log in (logging.getLogger(), logging.getLogger("rangedispatch")) if log.handlers]
    open_bar.enter_context(logging_redirect_tqdm(printing))
    bar = open_bar.enter_context(tqdm(total=total, desc=desc, unit="pt", dynamic_ncols=True))

    def step() -> None:
        bar.update(1)
        if bar.n == bar.total:
            open_bar.close()  # the summary that follows starts on its own line

    return step


def size_text(n: int) -> str:
    """Bytes the way people read them: ``512 B``, ``4 KiB``, ``1.5 MiB``, ``64 MiB``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"
