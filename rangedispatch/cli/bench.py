"""``rangedispatch-bench``: op-level, model-level and HF-model sweeps on 2+ GPUs, and HF ``generate``
on 1 or more, with a table, CSV and PNG.

    rangedispatch-bench hardware=h100                      # spawns bench.world_size ranks
    torchrun --nproc-per-node 2 -m rangedispatch.cli.bench hardware=h100
    rangedispatch-bench --cfg job                          # print the config it would run
    python -m rangedispatch.cli.bench_plot results.csv     # (re)draw the PNG from a CSV
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rangedispatch.bench.config import BenchConfig
from rangedispatch.cli import _common
from rangedispatch.cli.app import hydra_app
from rangedispatch.errors import ConfigError


def split_config(cfg: DictConfig):
    """The library config and the bench section as the run will use them."""
    return _common.split_config(cfg, BenchConfig, as_run=_as_run)


def _as_run(bench: BenchConfig) -> BenchConfig:
    """A smoke run's small shapes; its ranks, and hardware=auto, see no GPU."""
    if bench.smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything asks CUDA; the ranks inherit it
    return bench.as_run()


def run_rank(rank: int, world: int, cfg_yaml: str) -> dict:
    import torch

    from rangedispatch.bench import report, suites

    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="[rank0] %(message)s")
    lib, bench = split_config(OmegaConf.create(cfg_yaml))
    cuda = torch.cuda.is_available()
    op_variants = suites.OP_VARIANTS if cuda else suites.CPU_OP_VARIANTS
    total, skinny = 0, bool(lib.skinny_gemm_tokens)
    if "op" in bench.levels:
        total += len(bench.op_hidden) * len(bench.fp8) * len(bench.op_tokens) * len(op_variants)
    if "model" in bench.levels:
        total += len(bench.model_shapes) * len(bench.model_tokens) * (5 + bool(bench.compile_sizes) + skinny)
    if "hf" in bench.levels:
        total += len(bench.hf_shapes) * len(bench.hf_tp) * len(bench.hf_tokens) * (2 + bool(bench.compile_sizes) + skinny)
    if "generate" in bench.levels:
        total += len(bench.generate_shapes) * len(bench.generate_batch) * (1 + len(set(bench.generate_variants) - {"eager"}))
    step = _common.progress(total, rank, "timings")
    rows, generate_rows, boundaries = [], [], {}

    def keep(new_rows: list[dict]) -> None:
        """Each finished sweep goes into results.csv at once: a stopped run keeps what it measured."""
        rows.extend(new_rows)
        if rank == 0:
            Path(bench.out_dir).mkdir(parents=True, exist_ok=True)
            report.write_csv(report.annotate([dict(r) for r in rows]), Path(bench.out_dir) / "results.csv")

    if "op" in bench.levels:
        for hidden in bench.op_hidden:
            for fp8 in bench.fp8:
                keep(suites.op_level(lib, hidden, bench.op_tokens, fp8, bench.calls_per_graph, bench.replays, step,
                                     variants=op_variants))
    if "model" in bench.levels:
        for hidden, intermediate in bench.model_shapes:
            r, ranges = suites.model_level(lib, hidden, intermediate, bench.model_layers, bench.model_tokens,
                                           bench.calls_per_graph, bench.replays, step, bench.compile_sizes)
            keep(r)
            boundaries[hidden] = [int(x.strip("[]").split(",")[1]) for x in ranges][:-1]
    if "hf" in bench.levels:
        for hidden, intermediate in bench.hf_shapes:
            for style in bench.hf_tp:
                r, _ = suites.hf_level(lib, hidden, intermediate, bench.model_layers, style, bench.hf_tokens,
                                       bench.calls_per_graph, bench.replays, step, bench.compile_sizes,
                                       bench.hf_attention)
                keep(r)
    if "generate" in bench.levels:
        from rangedispatch.bench import generate

        for hidden, intermediate, layers in bench.generate_shapes:
            for batch in bench.generate_batch:
                generate_rows += generate.generate_level(
                    lib, hidden, intermediate, layers, batch, bench.generate_prompt, bench.generate_new_tokens,
                    bench.generate_repeats, bench.generate_variants, bench.hf_tp[0], bench.hbm_tb_s, step)
                if rank == 0:
                    Path(bench.out_dir).mkdir(parents=True, exist_ok=True)
                    write_rows(generate_rows, generate.FIELDS, Path(bench.out_dir) / "generate.csv")
    info = dict(card=torch.cuda.get_device_name() if cuda else f"CPU smoke run ({platform.processor() or 'cpu'})",
                world_size=world, torch=torch.__version__,
                date=str(datetime.date.today()), host=platform.node())
    return dict(rows=rows, generate_rows=generate_rows, boundaries=boundaries, info=info)


def write_rows(rows: list[dict], fields: list[str], path: Path) -> None:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def main(cfg: DictConfig) -> None:
    import torch

    from rangedispatch.bench import report
    from rangedispatch.cli.launch import init_from_env, spawn_ranks

    _, bench = split_config(cfg)
    if bench.smoke:
        print("bench.smoke: a CPU run on gloo with small shapes; it checks the tool, its times are not GPU "
              "performance", flush=True)
    elif "WORLD_SIZE" not in os.environ and torch.cuda.device_count() < bench.world_size:
        raise ConfigError(f"needs {bench.world_size} CUDA GPUs (bench.world_size={bench.world_size}), found "
                          f"{torch.cuda.device_count()}; bench.smoke=true runs a CPU smoke test")
    cfg_yaml = OmegaConf.to_yaml(cfg)
    backend = "gloo" if bench.smoke else "nccl"
    if "WORLD_SIZE" in os.environ:
        rank, world = init_from_env(backend)
        result = run_rank(rank, world, cfg_yaml)
        if rank != 0:
            return
    else:
        result = spawn_ranks(run_rank, bench.world_size, cfg_yaml, backend=backend)[0]
    out = Path(bench.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps({**result["info"], "boundaries": result["boundaries"]}, indent=1))
    if result["generate_rows"]:
        from rangedispatch.bench import generate

        text = generate.table(result["generate_rows"])
        (out / "generate.md").write_text(text)
        why = generate.plot(result["generate_rows"], out / "generate.png")
        print(text)
        print(f"wrote {out}/generate.csv, generate.md" + (f"; {why}" if why else ", generate.png"))
    if not result["rows"]:
        return
    rows = report.annotate(result["rows"])
    report.write_csv(rows, out / "results.csv")
    text = report.table(rows)
    (out / "table.md").write_text(text)
    why = report.plot(rows, out / "results.png", result["boundaries"])
    print(text)
    print(f"wrote {out}/results.csv, table.md, run.json" + (f"; {why}" if why else ", results.png"))


ABOUT = """rangedispatch-bench: op-level, model-level and HF-model sweeps on 2+ CUDA GPUs (NCCL, FlashInfer),
and HF generate (time to first token, per output token, tokens/s) on 1 or more:
a table, results.csv and results.png under bench.out_dir.

Main keys (every key, its meaning and default: docs/configuration.md in the rangedispatch repository):
  hardware=auto|h100|h200|b200|gpu_generic|<your profile>   bench.levels=[op,model,hf,generate]   bench.world_size=2   bench.smoke=true (CPU)
  bench.model_shapes=[[8192,28672]]   bench.hf_tp=[handwritten,dtensor]   bench.out_dir=bench-results

Examples:
  rangedispatch-bench hardware=h100 'bench.levels=[op]'
  torchrun --nproc-per-node 4 -m rangedispatch.cli.bench 'bench.levels=[model,hf]'
  rangedispatch-bench 'bench.levels=[generate]' bench.world_size=1
  rangedispatch-bench bench.smoke=true --cfg job   # every key with the value that will be used
"""

run = hydra_app(main, "bench", split_config, ABOUT, section=BenchConfig)

if __name__ == "__main__":
    run()
