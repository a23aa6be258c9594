"""Match counts that survive Inductor cache hits.

On an FX-graph-cache hit Inductor hands back the compiled graph without running the custom pass,
so the pass cannot count its matches. The pipeline's counts are written next to Inductor's cache,
keyed by the pre-grad graph and the pipeline's uuid, and read back on a hit.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional


def _record_dir() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "rangedispatch_matches"


def record_key(graph_code: str, input_meta: str, pipeline_uuid: str) -> str:
    return hashlib.sha256(f"{graph_code}\n{input_meta}\n{pipeline_uuid}".encode()).hexdigest()


def save(key: str, matches: dict[str, int]) -> None:
    d = _record_dir()
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f"{key}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(matches))
    os.replace(tmp, d / f"{key}.json")


def load(key: str) -> Optional[dict[str, int]]:
    try:
        return json.loads((_record_dir() / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None
