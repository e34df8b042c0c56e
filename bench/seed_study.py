"""Several finished ``qtool sensitivity`` studies side by side (``methods.json``, ``methods.png``): what
``qtool sensitivity -r a.yaml -r b.yaml …`` writes, for studies that were run one command at a time.

    .venv/bin/python bench/seed_study.py --out bench/out/seed-study \\
        GPTQ=bench/out/sensitivity-smollm2-w4g64 AWQ=bench/out/sensitivity-smollm2-awq-w4 \\
        SmoothQuant=bench/out/sensitivity-smollm2-sq-w8a8

Each argument is ``LABEL=STUDY_DIR`` (a directory holding ``sensitivity.json``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qtool.report import sensitivity as study


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("studies", nargs="+", help="LABEL=STUDY_DIR")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    reports = {}
    for item in a.studies:
        label, _, path = item.partition("=")
        reports[label] = json.loads((Path(path) / study.REPORT).read_text())
    a.out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(study.compare(reports, a.out), indent=1))


if __name__ == "__main__":
    main()
