"""OSTQuant training speed and memory per precision / checkpointing setting (``transform.dtype``,
``transform.activation_checkpointing``) on the W4A4KV4 recipe.

Each row is one ``qtool quantize`` process with a few training iterations, RTN weights and no evaluation, so peak
RSS (``os.wait4``) is that row's. Seconds per iteration come from the transform stage's ``train_seconds`` (the first
iteration included). Writes ``bench/ostquant-speed-<recipe stem>.json``. Compare rows of one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS: dict[str, list[str]] = {
    "float32": [],
    "float32+checkpointing": ["transform.activation_checkpointing=true"],
    "bfloat16": ["transform.dtype=bfloat16"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipe", default="recipes/w4a4-ostquant.yaml")
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="override for every row")
    args = ap.parse_args()
    common = [
        "outliers.method=none",
        "quantize={method: rtn}",
        "evaluate=null",
        f"transform.iterations={args.iterations}",
        *args.overrides,
    ]
    rows = {}
    for label, own in ROWS.items():
        sets = [x for o in [*common, *own] for x in ("--set", o)]
        run_dir = ROOT / "bench" / "out" / f"speed-{Path(args.recipe).stem}-{label}"
        cmd = [sys.executable, "-m", "qtool", "quantize", "-r", args.recipe, "--run-dir", str(run_dir), "--force"]
        start = time.time()
        err = run_dir.with_name(run_dir.name + ".stderr")
        err.parent.mkdir(parents=True, exist_ok=True)
        with err.open("w") as errfile:
            proc = subprocess.Popen(
                [*cmd, "--json", *sets], cwd=ROOT, stdout=subprocess.PIPE, stderr=errfile, text=True
            )
            stdout = proc.stdout.read()
            _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{label}: {' '.join(cmd)} failed:\n{err.read_text()[-2000:]}")
        tr = json.loads(stdout)["stages"]["transform"]["summary"]
        rows[label] = {
            "iterations": args.iterations,
            "train_seconds": tr["train_seconds"],
            "seconds_per_iteration": round(tr["train_seconds"] / args.iterations, 2),
            "loss_first": tr["loss_first"],
            "loss_last": tr["loss_last"],
            "wall_seconds": round(time.time() - start, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024),
        }
        print(label, json.dumps(rows[label]), flush=True)
    path = ROOT / "bench" / f"ostquant-speed-{Path(args.recipe).stem}.json"
    meta = {
        "recipe": args.recipe,
        "overrides": args.overrides,
        "cpus": os.cpu_count(),
        "date": time.strftime("%F %H:%M"),
    }
    path.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
