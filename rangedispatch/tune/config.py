"""What ``rangedispatch-tune`` measures and where it writes (the ``tune:`` section of conf/tune.yaml)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rangedispatch.config.checks import check_int, check_int_list, check_str, fail
from rangedispatch.config.loader import config_dir

MiB = 1 << 20
# The sweep for each key left at None: the full one on GPUs; on CPU, where only the reference tier
# exists and the numbers only show that the tool and the profile work, one that takes about 2 minutes
# on 2 cores: one hidden size, small sizes (the 2-layer block's matmuls dominate on CPU), and two
# repeats, so that the rule sees the spread between them.
GPU_SWEEP = dict(hidden=[2048, 4096, 8192], max_bytes=64 * MiB, sp_max_bytes=128 * MiB, fp8=[False, True], repeats=2)
CPU_SWEEP = dict(hidden=[1024], max_bytes=256 * 1024, sp_max_bytes=16 * 1024, fp8=[False], repeats=2)


@dataclass
class TuneConfig:
    SECTION = "tune"

    # Name of the profile to write (hardware/<name>.yaml under out_dir); load it with
    # load_config(["hardware=<name>"], config_dirs=[out_dir]), or copy out_dir/hardware/ into
    # ~/.config/rangedispatch/. Not a built-in profile's name (cpu, h100, ...): those always win.
    name: str = "tuned"
    # Hidden sizes to sweep (bf16). The profile takes the most restrictive crossover over all of them.
    # None: GPU_SWEEP's or CPU_SWEEP's (above), as for the next three keys.
    hidden: Optional[list[int]] = None
    # Sweep token counts 1, 2, 4, ... up to this many bytes per rank (tokens x hidden x 2).
    max_bytes: Optional[int] = None
    # The sequence-parallel tier is measured on its own unit (2 layers of a TP MLP block, sequence
    # parallelism vs NCCL) from 1 token up to this many bytes per rank; 0: not measured.
    sp_max_bytes: Optional[int] = None
    # With FP8 quant after the norm, without, or both (both: the more restrictive wins).
    fp8: Optional[list[bool]] = None
    # Whole sweeps to run. A tier takes a size only if its slowest repeat beats the other tier's
    # fastest by the margin (rangedispatch/tune/crossover.py): more repeats, fewer thresholds moved by noise.
    repeats: Optional[int] = None
    # Ranks to spawn when not started by torchrun. Integer >= 2.
    world_size: int = 2
    # Timing: calls per CUDA graph and replays (median).
    calls_per_graph: int = 10
    replays: int = 15
    # Where hardware/<name>.yaml, sweep.csv (+ sweep_info.json), summary.md and sweep.png go.
    out_dir: str = "tune-results"
    # Analyze a recorded sweep.csv (with its sweep_info.json) instead of measuring.
    from_csv: str = ""

    def __post_init__(self) -> None:
        k = self.SECTION
        check_str(f"{k}.name", self.name)
        if not self.name.replace("_", "").replace("-", "").isalnum():
            raise fail(f"{k}.name", self.name, "letters, digits, '_' and '-'")
        builtin = sorted(p.stem for p in (config_dir() / "hardware").glob("*.yaml"))
        if self.name in builtin:
            raise fail(f"{k}.name", self.name, f"a name other than the built-in profiles' ({', '.join(builtin)}), "
                       "which a written profile could not override")
        if self.hidden is not None:
            self.hidden = check_int_list(f"{k}.hidden", self.hidden, lo=1)
            if not self.hidden:
                raise fail(f"{k}.hidden", self.hidden, "a non-empty list of hidden sizes, or null")
        if self.max_bytes is not None:
            check_int(f"{k}.max_bytes", self.max_bytes, lo=2)
        if self.sp_max_bytes is not None:
            check_int(f"{k}.sp_max_bytes", self.sp_max_bytes, lo=0)
        if self.fp8 is not None and (not isinstance(self.fp8, list) or not self.fp8
                                     or not all(isinstance(v, bool) for v in self.fp8)):
            raise fail(f"{k}.fp8", self.fp8, "a non-empty list of true/false, or null")
        if self.repeats is not None:
            check_int(f"{k}.repeats", self.repeats, lo=1)
        check_int(f"{k}.world_size", self.world_size, lo=2)
        check_int(f"{k}.calls_per_graph", self.calls_per_graph, lo=1)
        check_int(f"{k}.replays", self.replays, lo=1)
        check_str(f"{k}.out_dir", self.out_dir)
        if self.from_csv and not Path(self.from_csv).is_file():
            raise fail(f"{k}.from_csv", self.from_csv, "the path of a sweep.csv written by rangedispatch-tune; "
                       "no such file")
        if self.from_csv and not (Path(self.from_csv).parent / "sweep_info.json").is_file():
            raise fail(f"{k}.from_csv", self.from_csv, "a sweep.csv with the sweep_info.json written beside it; "
                       "that file is missing")

    def for_device(self, cuda: bool) -> "TuneConfig":
        """This config with every key left at None taken from the GPU or the CPU sweep."""
        sweep = GPU_SWEEP if cuda else CPU_SWEEP
        return dataclasses.replace(self, **{k: v for k, v in sweep.items() if getattr(self, k) is None})

    def tokens(self, hidden: int, max_bytes: Optional[int] = None) -> list[int]:
        """1, 2, 4, ... tokens while tokens x hidden x 2 bytes fit ``max_bytes`` (default: ``max_bytes``)."""
        limit = self.max_bytes if max_bytes is None else max_bytes
        out, n = [], 1
        while n * hidden * 2 <= limit:
            out.append(n)
            n *= 2
        return out
