"""Redraw a benchmark PNG from its CSV (the GPU host may lack matplotlib):
``python -m rangedispatch.cli.bench_plot results.csv [run.json] [out.png]``."""

import argparse
import json
from pathlib import Path

from rangedispatch.bench import report


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m rangedispatch.cli.bench_plot",
                                     description="Redraw a rangedispatch-bench PNG from its results.csv.")
    parser.add_argument("csv", type=Path, help="results.csv written by rangedispatch-bench")
    parser.add_argument("run_json", type=Path, nargs="?", help="its run.json (range boundaries to draw)")
    parser.add_argument("png", type=Path, nargs="?", help="where to write (default: the CSV's name, .png)")
    args = parser.parse_args()
    try:
        run = json.loads(args.run_json.read_text()) if args.run_json else {}
        rows = report.read_csv(args.csv)
    except OSError as e:
        parser.exit(2, f"{parser.prog}: {e.filename}: {e.strerror}\n")
    except (ValueError, KeyError) as e:
        parser.exit(2, f"{parser.prog}: not what rangedispatch-bench writes ({type(e).__name__}: {e})\n")
    boundaries = {int(k): v for k, v in run.get("boundaries", {}).items()}
    png = args.png or args.csv.with_suffix(".png")
    why = report.plot(rows, png, boundaries)
    print(why or f"wrote {png}")


if __name__ == "__main__":
    main()
