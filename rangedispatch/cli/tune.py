"""``rangedispatch-tune``: measure every all-reduce tier over a token sweep, find the crossovers,
write a hardware profile.

    rangedispatch-tune tune.name=my_gpu                   # spawns tune.world_size ranks
    torchrun --nproc-per-node 4 -m rangedispatch.cli.tune tune.name=my_gpu hardware=h100
    rangedispatch-tune --cfg job

Tiers on GPUs: NCCL + compiled norm, fused one-shot and two-shot (each with and without FP8),
symmetric memory one-shot and two-shot. On CPU only the reference tier exists (gloo all-reduce and
eager math in one op): it is measured against gloo + compiled norm, and the tool says so. The
sequence-parallel tier is measured on a 2-layer TP block against NCCL, on GPUs and CPUs alike.
The profile follows from the sweep by the one rule in ``rangedispatch/tune/crossover.py``, which the
summary quotes.
"""

from __future__ import annotations

import csv
import datetime
import json
import logging
import os
import platform
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from rangedispatch.cli import _common
from rangedispatch.cli.app import hydra_app
from rangedispatch.config.checks import fail
from rangedispatch.config.loader import PROFILE_PATH_ENV, config_dir
from rangedispatch.errors import ConfigError
from rangedispatch.fusion.tiers import sweep_variants
from rangedispatch.tune.config import TuneConfig

SWEEP_FIELDS = ["repeat", "hidden", "fp8", "tokens", "bytes", "tier", "us"]


def split_config(cfg):
    """The library config and the tune section, its sweep filled in for this machine (GPU or CPU)."""
    import torch

    lib, tune = _common.split_config(cfg, TuneConfig)
    return lib, tune.for_device(torch.cuda.is_available())


def measure_rank(rank: int, world: int, cfg_yaml: str) -> dict:
    """Every rank measures (the tiers are collectives); rank 0 appends each finished series to
    ``out_dir/sweep.csv`` as it goes, so a stopped sweep keeps what it measured."""
    import dataclasses

    import torch

    from rangedispatch.bench import suites

    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="[rank0] %(message)s")
    for name in ("rangedispatch", "torch"):
        logging.getLogger(name).setLevel(logging.WARNING)  # the progress bar is the output here
    lib, tune = split_config(OmegaConf.create(cfg_yaml))
    cuda = torch.cuda.is_available()
    if not cuda:
        # each rank its share of the cores: oversubscribed, every parallel kernel waits for a
        # descheduled thread (the CPU sweep ran 3x slower, its timings mostly that wait)
        torch.set_num_threads(max(1, torch.get_num_threads() // world))
    tiers, block_tiers = sweep_variants("op", cuda), sweep_variants("block", cuda)
    info = dict(card=torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                torch=torch.__version__, flashinfer=_version("flashinfer-python"), world_size=world,
                date=str(datetime.date.today()))
    if rank == 0:
        _start_sweep_files(Path(tune.out_dir), info, cuda)
    if rank == 0 and not cuda:
        print("CPU: measuring the reference tier (gloo all-reduce + eager math in one op) against gloo + "
              "compiled norm; GPU tiers need CUDA", flush=True)
    total = tune.repeats * (len(tune.fp8) * sum(len(tune.tokens(h)) for h in tune.hidden) * len(tiers)
                            + sum(len(tune.tokens(h, tune.sp_max_bytes)) for h in tune.hidden) * len(block_tiers))
    step = _common.progress(total, rank, "tune")
    rows = []

    def keep(series: list[dict]) -> None:
        rows.extend(series)
        if rank == 0:
            with open(Path(tune.out_dir) / "sweep.csv", "a", newline="") as f:
                csv.DictWriter(f, fieldnames=SWEEP_FIELDS).writerows(series)

    for repeat in range(tune.repeats):
        for hidden in tune.hidden:
            # the fused workspace is sized for max_num_tokens: only as large as this sweep needs; every
            # size runs the same range graph (no single-size graphs, which would be autotuned)
            sized = dataclasses.replace(
                lib, dispatch=dataclasses.replace(lib.dispatch, max_num_tokens=max(16, *tune.tokens(hidden)),
                                                  split_points=[], compile_sizes=[]),
                hardware=dataclasses.replace(lib.hardware, compile_sizes=[]))
            for fp8 in tune.fp8:
                keep([dict(repeat=repeat, hidden=hidden, fp8=fp8, tokens=r["tokens"],
                           bytes=r["tokens"] * hidden * 2, tier=tiers[r["variant"]], us=r["us"])
                      for r in suites.op_level(sized, hidden, tune.tokens(hidden), fp8, tune.calls_per_graph,
                                               tune.replays, step, variants=list(tiers))])
            if tune.tokens(hidden, tune.sp_max_bytes):
                keep([dict(repeat=repeat, hidden=hidden, fp8=False, tokens=r["tokens"],
                           bytes=r["tokens"] * hidden * 2, tier=block_tiers[r["variant"]], us=r["us"])
                      for r in suites.sequence_parallel_level(sized, hidden, tune.tokens(hidden, tune.sp_max_bytes),
                                                              tune.calls_per_graph, tune.replays, step)])
    return dict(rows=rows, info=info, cuda=cuda)


def _start_sweep_files(out: Path, info: dict, cuda: bool) -> None:
    """``sweep_info.json``, and ``sweep.csv`` with its header only: each series is appended when done."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_info.json").write_text(json.dumps({**info, "cuda": cuda}, indent=1))
    with open(out / "sweep.csv", "w", newline="") as f:
        csv.DictWriter(f, fieldnames=SWEEP_FIELDS).writeheader()


def _version(dist_name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist_name)
    except PackageNotFoundError:
        return "not installed"


def summarize(result: dict, lib, tune) -> tuple[str, str]:
    """(summary markdown, profile yaml), both from one analysis of the rows."""
    from rangedispatch.tune import crossover, profile, report

    rows, info = result["rows"], result["info"]
    measured = crossover.thresholds(rows)
    entry = profile.measured_entry(measured)
    provenance = [f"{info['date']} on {info['card']} x{info['world_size']}, {report.sweep_text(rows, info)}",
                  f"Each tier takes a size only where it beat the tier it replaces by more than {crossover.MARGIN:.0%} "
                  "from its slowest repeat to the other's fastest; summary.md, written with this file, says why.",
                  "Thresholds are bytes of one rank's all-reduce input (tokens x hidden x dtype size)."]
    backend = "flashinfer" if result["cuda"] else "reference"
    device_name = info["card"] if result["cuda"] else "cpu"
    return (report.summary(rows, info, measured, entry, tune.name),
            profile.render(tune.name, backend, info["world_size"], entry, lib.hardware, provenance, device_name))


def plot(rows: list[dict], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no PNG: {e}"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict = {}
    for r in rows:
        series.setdefault((r["repeat"], r["hidden"], r["fp8"]), {}).setdefault(r["bytes"], {})[r["tier"]] = r["us"]
    from rangedispatch.tune.crossover import ASYNC_TP_TIER, FUSED_TIERS, MARGIN, SP_BASE, SP_TIER, SYMM_TIERS

    for (repeat, hidden, fp8), by_bytes in sorted(series.items()):
        for tiers, base, style, what in ((FUSED_TIERS, "nccl", "-" if repeat == 0 else "--", "fused"),
                                         (SYMM_TIERS, "nccl", ":", "symm-mem"),
                                         ((SP_TIER,), SP_BASE, "-.", "sequence parallel (2-layer block)"),
                                         ((ASYNC_TP_TIER,), SP_BASE, (0, (1, 3)), "async TP (2-layer block)")):
            sizes = sorted(b for b, t in by_bytes.items() if base in t and any(k in t for k in tiers))
            if not sizes or (what != "fused" and repeat):
                continue
            ratio = [min(v for k, v in by_bytes[b].items() if k in tiers) / by_bytes[b][base] for b in sizes]
            ax.plot(sizes, ratio, marker="o", ms=3, ls=style,
                    label=f"{what}, hidden {hidden}{' fp8' if fp8 else ''} (repeat {repeat})")
    ax.axhline(1.0, color="gray", lw=1)
    ax.axhline(1 - MARGIN, color="gray", lw=1, ls=":", label=f"{MARGIN:.0%} faster: a tier takes a size below this")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bytes per rank")
    ax.set_ylabel("best of tier / NCCL (+ compiled norm)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def _load_sweep(path: Path) -> dict:
    """A recorded sweep (sweep.csv and the sweep_info.json beside it) to analyze again."""
    try:
        with open(path) as f:
            rows = [dict(repeat=int(r["repeat"]), hidden=int(r["hidden"]), fp8=r["fp8"] == "True",
                         tokens=int(r["tokens"]), bytes=int(r["bytes"]), tier=r["tier"], us=float(r["us"]))
                    for r in csv.DictReader(f)]
        meta = json.loads((path.parent / "sweep_info.json").read_text())
        info = {k: meta[k] for k in ("card", "torch", "flashinfer", "world_size", "date")}
        cuda = meta["cuda"]
    except (KeyError, TypeError, ValueError) as e:  # a missing column or key, a value that is no number
        raise fail("tune.from_csv", str(path),
                   f"a sweep written by rangedispatch-tune ({type(e).__name__}: {e})") from None
    if not rows:
        raise fail("tune.from_csv", str(path), "a sweep with measurements (this one has its header only)")
    return dict(rows=rows, info=info, cuda=cuda)


@hydra.main(config_path=str(config_dir()), config_name="tune", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from rangedispatch.cli.launch import init_from_env, spawn_ranks
    from rangedispatch.tune import profile

    lib, tune = split_config(cfg)
    cfg_yaml = OmegaConf.to_yaml(cfg)
    if tune.from_csv:
        try:
            result = _load_sweep(Path(tune.from_csv))
        except ConfigError as e:
            print(f"rangedispatch-tune: {e}", file=sys.stderr)
            sys.exit(2)
    elif "WORLD_SIZE" in os.environ:
        rank, world = init_from_env()
        result = measure_rank(rank, world, cfg_yaml)
        if rank != 0:
            return
    else:
        result = spawn_ranks(measure_rank, tune.world_size, cfg_yaml)[0]
    out = Path(tune.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary, yaml_text = summarize(result, lib, tune)
    (out / "summary.md").write_text(summary)
    path = profile.write(out, tune.name, yaml_text)
    why = plot(result["rows"], out / "sweep.png")
    print(summary)
    sweep = tune.from_csv or f"{out}/sweep.csv"
    print(f"wrote {path}, {out}/summary.md" + (f"; {why}" if why else f", {out}/sweep.png") + f"; the sweep: {sweep}")
    print(f"use it: load_config(['hardware={tune.name}'], config_dirs=['{out}']), or copy {path.parent} into "
          f"a folder of {PROFILE_PATH_ENV} or ~/.config/rangedispatch/ (then hardware={tune.name} and "
          "hardware=auto find it everywhere)")


ABOUT = """rangedispatch-tune: measure where each all-reduce tier pays on this machine (fused one/two-shot,
symmetric memory, NCCL) and write a hardware profile with its provenance, sweep CSV/PNG and summary.

Main keys (every key, its meaning and default: docs/configuration.md in the rangedispatch repository):
  tune.name=<profile name>   tune.world_size=2   tune.out_dir=tune-results   tune.from_csv=<sweep.csv>

Examples:
  torchrun --nproc-per-node 2 -m rangedispatch.cli.tune tune.name=my_gpu
  mkdir -p ~/.config/rangedispatch && cp -r tune-results/hardware ~/.config/rangedispatch/
"""

run = hydra_app(main, "tune", split_config, ABOUT, section=TuneConfig)

if __name__ == "__main__":
    run()
