"""Redraw a benchmark PNG from its CSV (the GPU host may lack matplotlib):
``python -m rangedispatch.cli.bench_plot results.csv [run.json] [out.png]``."""

import json
import sys
from pathlib import Path

from rangedispatch.bench import report


def main() -> None:
    csv_path = Path(sys.argv[1])
    run = json.loads(Path(sys.argv[2]).read_text()) if len(sys.argv) > 2 else {}
    png = Path(sys.argv[3]) if len(sys.argv) > 3 else csv_path.with_suffix(".png")
    boundaries = {int(k): v for k, v in run.get("boundaries", {}).items()}
    why = report.plot(report.read_csv(csv_path), png, boundaries)
    print(why or f"wrote {png}")


if __name__ == "__main__":
    main()
