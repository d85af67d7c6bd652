#!/usr/bin/env python3
"""Runs the report of the `sinkscope` Python package (python/sinkscope/report.py).

Kept so that `sinkscope report` and older scripts find the report by path; the package is taken
from next to this file (source tree: ../python; installed: ./python) unless it is importable.
usage: sinkscope_report.py INPUT --out DIR [--top N]   (same as python3 -m sinkscope.report)
"""
import os
import sys

here = os.path.dirname(os.path.realpath(__file__))
for candidate in (os.path.join(here, "python"), os.path.join(here, os.pardir, "python")):
    if os.path.isfile(os.path.join(candidate, "sinkscope", "report.py")):
        sys.path.insert(0, os.path.abspath(candidate))
        break

from sinkscope.report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
