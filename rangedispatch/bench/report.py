"""Turning benchmark rows into the table, the CSV (with ``vs_best_static`` and speedups) and a PNG."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional

from rangedispatch.fusion.tiers import ASYNC_TP, SEQUENCE_PARALLEL

# the variants that run one tier at every size
STATIC = ("fusion_off", "fusion_everywhere", SEQUENCE_PARALLEL.name, ASYNC_TP.name)


def baseline(level: str) -> str:
    """The variant a level's speed-ups are over: NCCL + a compiled norm for ops, torch.compile of the
    same model for the model and HF levels."""
    return "nccl_compiled_norm" if level == "op" else "torch_compile"


def annotate(rows: list[dict]) -> list[dict]:
    """Adds ``speedup`` (vs the level's baseline) to every row and ``vs_best_static`` (range dispatch
    over the fastest of fusion off, fusion everywhere, sequence parallelism everywhere) to
    range-dispatch rows."""
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        groups[(r["level"], r["hidden"], r["fp8"], r["tokens"])][r["variant"]] = r
    for (level, *_), by_variant in groups.items():
        base = by_variant.get(baseline(level))
        for r in by_variant.values():
            r["speedup"] = round(base["us"] / r["us"], 3) if base else None
        rd = by_variant.get("range_dispatch")
        static = [by_variant[v]["us"] for v in STATIC if v in by_variant]
        if rd and static:
            rd["vs_best_static"] = round(rd["us"] / min(static), 3)
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    fields = ["level", "hidden", "fp8", "tokens", "variant", "us", "speedup", "vs_best_static", "range", "compile_s",
              "matches", "rel_err", "method"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in fields})


def read_csv(path: Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for r in csv.DictReader(f):
            r["hidden"], r["tokens"], r["us"] = int(r["hidden"]), int(r["tokens"]), float(r["us"])
            r["fp8"] = r["fp8"] == "True"
            rows.append(r)
    return rows


def table(rows: Iterable[dict]) -> str:
    """Markdown: one table per (level, hidden, fp8), tokens down, variants across (us, speedup).
    Written directly: a pipe table is three string joins, not worth a table library as a dependency."""
    groups: dict[tuple, dict[int, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        groups[(r["level"], r["hidden"], r["fp8"])][r["tokens"]][r["variant"]] = r
    out = []
    for (level, hidden, fp8), by_tokens in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1], kv[0][2])):
        variants = list(dict.fromkeys(v for vs in by_tokens.values() for v in vs))
        extra = (["range", "vs best static"] if level == "model" else ["range", "matches (all graphs)", "rel err"]
                 if level.startswith("hf") else [])
        compiled = [v for v in variants if v.startswith("range_dispatch")] if extra else []
        extra += [f"compile s ({' / '.join(compiled)})"] if compiled else []
        out.append(f"\n### {level} level, hidden {hidden}, bf16{', FP8 quant' if fp8 else ''} (us per call; x = speedup vs {baseline(level)})\n")
        out.append("| tokens | " + " | ".join(variants + extra) + " |")
        out.append("|" + "---|" * (len(variants) + len(extra) + 1))
        for n in sorted(by_tokens):
            cells = []
            for v in variants:
                r = by_tokens[n].get(v)
                cells.append(f"{r['us']:.1f} ({r['speedup']:.2f}x)" if r and r.get("speedup") else (f"{r['us']:.1f}" if r else "n/a"))
            if extra:
                rd = by_tokens[n].get("range_dispatch", {})
                keys = ("range", "vs_best_static") if level == "model" else ("range", "matches", "rel_err")
                cells += [str(rd.get(k, "")) for k in keys]
                if compiled:
                    cells.append(" / ".join(str(by_tokens[n].get(v, {}).get("compile_s", "")) for v in compiled))
            out.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path, boundaries: Optional[dict[int, list[int]]] = None) -> Optional[str]:
    """Latency vs tokens, one line per variant, one panel per (level, hidden, fp8); dotted lines at
    range-dispatch boundaries. Returns why not, if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no PNG: {e}"
    groups: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[(r["level"], r["hidden"], r["fp8"])][r["variant"]].append((r["tokens"], r["us"]))
    keys = sorted(groups, key=lambda k: (k[0], -k[1], k[2]))
    fig, axes = plt.subplots(2, len(keys), figsize=(5 * len(keys), 8), squeeze=False, sharex="col")
    for col, key in enumerate(keys):
        top, bottom = axes[0][col], axes[1][col]
        base = dict(groups[key].get(baseline(key[0]), []))
        for variant, pts in groups[key].items():
            pts.sort()
            xs = [p[0] for p in pts]
            top.plot(xs, [p[1] for p in pts], marker="o", ms=3, label=variant)
            bottom.plot(xs, [base[n] / us if n in base else float("nan") for n, us in pts], marker="o", ms=3, label=variant)
        for ax in (top, bottom):
            for b in (boundaries or {}).get(key[1], []) if key[0] == "model" else []:
                ax.axvline(b, color="gray", ls=":", lw=1)
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
        top.set_yscale("log")
        top.set_ylabel("us per call")
        top.set_title(f"{key[0]} level, hidden {key[1]}{', FP8' if key[2] else ''}")
        top.legend(fontsize=7)
        bottom.set_ylabel(f"speedup vs {baseline(key[0])}")
        bottom.set_xlabel("tokens (dotted: range boundaries)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None
