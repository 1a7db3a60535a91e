"""Regenerate the write-up figures of saved runs, and a report.md, without recomputing anything.

    python analyses/make_figures.py results/head_sweep/<run> results/sae_features/<run>
    python analyses/make_figures.py RUN... --out report/report.md

Each RUN folder is recognised by its kind (head sweep, patching sweep, function vectors, steering,
detection, SAE features; see mechlie.report.kinds) and read
only from its saved files. Writes, under the folder of --out, one subfolder of figures per run
(SVG + PNG, one style, 95% CIs where the saved data have them) and report.md with the headline
numbers. A folder of an unknown kind, an older format or with a missing file is refused with one
line, before anything is written.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mechlie.report.kinds import RunFormatError, write_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (results/<script>/<run>)")
    p.add_argument("--out", default="report/report.md", help="the report; figures go beside it")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("kaleido", "choreographer", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        out = write_report(args.runs, args.out)
    except (RunFormatError, OSError, ValueError, KeyError) as e:
        if args.debug:
            raise
        print(f"error: {e} (--debug shows the traceback)", file=sys.stderr)
        return 2
    print(f"wrote {out} and its figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
