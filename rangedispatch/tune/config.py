"""What ``rangedispatch-tune`` measures and where it writes (the ``tune:`` section of conf/tune.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field

from rangedispatch.config.checks import check_int, check_int_list, check_str, fail


@dataclass
class TuneConfig:
    SECTION = "tune"

    # Name of the profile to write (conf/hardware/<name>.yaml under out_dir); load it with
    # load_config(["hardware=<name>"], config_dirs=[out_dir]) or copy it into conf/hardware/.
    name: str = "tuned"
    # Hidden sizes to sweep (bf16). The profile takes the most restrictive crossover over all of them.
    hidden: list[int] = field(default_factory=lambda: [2048, 4096, 8192])
    # Sweep token counts 1, 2, 4, ... up to this many bytes per rank (tokens x hidden x 2).
    max_bytes: int = 64 * 1024 * 1024
    # With FP8 quant after the norm, without, or both (both: the more restrictive wins).
    fp8: list[bool] = field(default_factory=lambda: [False, True])
    # Whole sweeps to run; thresholds are given per repeat (their spread is the noise) and the
    # profile takes the smallest.
    repeats: int = 2
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
        self.hidden = check_int_list(f"{k}.hidden", self.hidden, lo=1)
        if not self.hidden:
            raise fail(f"{k}.hidden", self.hidden, "a non-empty list of hidden sizes")
        check_int(f"{k}.max_bytes", self.max_bytes, lo=2)
        if not isinstance(self.fp8, list) or not self.fp8 or not all(isinstance(v, bool) for v in self.fp8):
            raise fail(f"{k}.fp8", self.fp8, "a non-empty list of true/false")
        check_int(f"{k}.repeats", self.repeats, lo=1)
        check_int(f"{k}.world_size", self.world_size, lo=2)
        check_int(f"{k}.calls_per_graph", self.calls_per_graph, lo=1)
        check_int(f"{k}.replays", self.replays, lo=1)
        check_str(f"{k}.out_dir", self.out_dir)

    def tokens(self, hidden: int) -> list[int]:
        out, n = [], 1
        while n * hidden * 2 <= self.max_bytes:
            out.append(n)
            n *= 2
        return out
