"""Regenerate the write-up figures of saved runs, and a report.md, without recomputing anything.

    python analyses/make_figures.py results/head_sweep/<run> results/sae_features/<run>
    python analyses/make_figures.py RUN... --out report/report.md

Each RUN folder is read back by the study that wrote it (its summary.json names it; see
mechlie.studies), from its saved files only. Writes, under the folder of --out, one subfolder of
figures per run (SVG + PNG, one style, 95% CIs where the saved data have them) and report.md with
the headline numbers. A folder of an unknown study, an older format or with a missing file is
refused with one line, before anything is written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mechlie.core.io import UserError
from mechlie.report.markdown import write_report
from mechlie.studies.base import load_result


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
        if Path(args.out).is_dir():
            raise UserError(
                f"--out {args.out} is a directory; give the report's file, e.g. {Path(args.out) / 'report.md'}"
            )
        results = [load_result(run) for run in args.runs]  # every run is read before anything is written
        command = " ".join(["python analyses/make_figures.py", *args.runs, "--out", args.out])
        out = write_report(results, args.out, command=command)
    except (UserError, OSError, ValueError, KeyError) as e:
        if args.debug:
            raise
        print(f"error: {e} (--debug shows the traceback)", file=sys.stderr)
        return 2
    print(f"wrote {out} and its figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
