"""``RANGEDISPATCH_LOGS``: turn on the library's log lines without writing logging code, in the
spirit of ``TORCH_LOGS``. ``RANGEDISPATCH_LOGS=info`` shows ranges, per-range compiles (passes,
matches, seconds), fusion decisions and fallbacks on stderr; ``debug`` adds traced graphs;
``warning`` (what Python shows by default) only fallbacks that cost speed or correctness."""

from __future__ import annotations

import logging
import os

ENV = "RANGEDISPATCH_LOGS"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_configured = False
_said: set[str] = set()
log = logging.getLogger("rangedispatch")


def warn_once(message: str) -> None:
    """A fallback in an op (called on every step) is said once per process and reason."""
    if message not in _said:
        _said.add(message)
        log.warning("%s", message)


def _tag_rank(record: logging.LogRecord) -> bool:
    """Under torch.distributed every rank logs: each line names its rank."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    record.rank = f" rank {dist.get_rank()}" if distributed else ""
    return True


def configure_from_env() -> None:
    """If ``RANGEDISPATCH_LOGS`` is set, log the library at that level to stderr. The value is
    checked on every call (a bad one is refused each time); the handler is added once per process."""
    global _configured
    value = os.environ.get(ENV, "").strip().lower()
    if not value:
        return
    if value not in _LEVELS:
        from rangedispatch.errors import ConfigError

        raise ConfigError(f"{ENV}={value!r} is not a log level; allowed: {', '.join(_LEVELS)}")
    if _configured:
        return
    _configured = True
    logger = logging.getLogger("rangedispatch")
    logger.setLevel(_LEVELS[value])
    handler = logging.StreamHandler()
    handler.addFilter(_tag_rank)
    handler.setFormatter(logging.Formatter("[rangedispatch%(rank)s] %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False  # one line per message, whatever the root logger does
