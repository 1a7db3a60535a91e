"""Rerun every study whose results docs/results/ shows, then regenerate those pages.

    python analyses/reproduce.py                          # every study in docs/results/
    python analyses/reproduce.py --studies head_sweep     # only these
    python analyses/reproduce.py --no-docs                # run, but leave docs/ as it is

Each study runs with its default flags, one after another (each loads the model and uses every
core), in its usual run folder (results/<study>/<run>), so running this again resumes where an
interrupted reproduction stopped. Each finished run is then copied into docs/results/ (as
`python -m mechlie.studies.docs --add RUN_DIR` does) and every page and the README's headline
block are regenerated. It prints how long each study took. See mechlie.studies.docs.rerun.
"""

from __future__ import annotations

import argparse
import sys

from mechlie.studies import docs
from mechlie.studies.base import RunFormatError


def main(argv: list[str] | None = None) -> int:
    root = docs.default_root()
    shown = [entry.name for entry in docs.committed(root)]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--studies", nargs="+", default=shown, help=f"studies to rerun (default: {' '.join(shown)})")
    p.add_argument("--no-docs", dest="docs", action="store_false", help="do not update docs/results/")
    args = p.parse_args(argv)
    try:
        timings = docs.rerun(args.studies, root, add=args.docs)
    except RunFormatError as e:
        p.error(str(e))
    print("\nstudy            wall (s)  exit")
    for name, took, code in timings:
        print(f"{name:<16} {took:>8.0f}  {code}")
    failed = [name for name, _, code in timings if code != 0]
    if failed:
        print(f"failed: {' '.join(failed)} (run again to resume them)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
