"""Export chosen TensorBoard scalars of runs to CSV and PNG (rdhpc.monitor.tb_export).

    python tools/tb_export.py runs/x --tags 'train/loss,val/loss_r*' --out report/
    python tools/tb_export.py runs/a runs/b --tags train/loss --out report/ --smooth 0.9
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rdhpc.errors import UserError  # noqa: E402
from rdhpc.monitor.tb_export import export  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (event files anywhere below them)")
    parser.add_argument("--tags", required=True, help="comma-separated tags or patterns, e.g. 'train/loss,val/*'")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--smooth", type=float, default=0.0, help="exponential smoothing weight in [0, 1) for PNGs")
    parser.add_argument("--log-x", action="store_true", help="logarithmic x axis")
    args = parser.parse_args(argv)
    if not 0 <= args.smooth < 1:
        print("tb_export: --smooth must be in [0, 1)", file=sys.stderr)
        return 2
    try:
        export(args.runs, [t for t in args.tags.split(",") if t.strip()], args.out, args.smooth, args.log_x)
    except UserError as exc:
        print(f"tb_export: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
