"""Match counts that survive Inductor cache hits.

On an FX-graph-cache hit Inductor hands back the compiled graph without running the custom pass,
so the pass cannot count its matches. We keep the counts next to Inductor's cache, keyed by
Inductor's own FX-graph cache key (which already covers the graph and our pass's uuid), so a hit
from any process, or from another model whose graph compiles to the same thing, finds them.
Inductor only reports that key in its log ("fx graph cache hit/miss for key ..."), so we listen there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Iterator, Optional

_KEY_MESSAGE = re.compile(r"fx graph cache (hit|miss) for key (\S+)")
_INDUCTOR_CACHE_LOGGER = "torch._inductor.codecache"


def _record_dir() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "rangedispatch_matches"


class _KeyListener(logging.Filter):
    """Notes Inductor's cache keys; lets through only what the logger would have emitted anyway."""

    def __init__(self, emit_info: bool):
        super().__init__()
        self.emit_info = emit_info
        self.keys: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        m = _KEY_MESSAGE.match(record.getMessage())
        if m:
            self.keys.append(m.group(2))
        return record.levelno > logging.INFO or self.emit_info


@contextlib.contextmanager
def inductor_cache_keys() -> Iterator[list[str]]:
    """The FX-graph cache keys Inductor looks up inside the block (last one: the graph compiled)."""
    logger = logging.getLogger(_INDUCTOR_CACHE_LOGGER)
    listener = _KeyListener(emit_info=logger.isEnabledFor(logging.INFO))
    level = logger.level
    logger.addFilter(listener)
    if not listener.emit_info:
        logger.setLevel(logging.INFO)
    try:
        yield listener.keys
    finally:
        logger.setLevel(level)
        logger.removeFilter(listener)


def save(key: str, matches: dict[str, int]) -> None:
    d = _record_dir()
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f"{key}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(matches))
    os.replace(tmp, d / f"{key}.json")


def load(key: str, wait_s: float = 2.0) -> Optional[dict[str, int]]:
    """The counts for ``key``. Another rank may have just written the cache entry and be about to
    write its counts: wait a little for them."""
    path = _record_dir() / f"{key}.json"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)
