"""OSTQuant ablation: hadamard start vs learned rotations only / + scaling, KL-Top vs MSE vs CE.

Runs ``qtool quantize`` once per row (same recipe, same budget, ``--set`` overrides only) and writes
``bench/ostquant-ablation-<recipe stem>.json`` with ppl, gap, training loss and wall time per row.
Default: the fast stories260K recipe; ``--recipe recipes/w4a4-ostquant.yaml`` for SmolLM2 (hours on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS: dict[str, list[str]] = {
    "hadamard": ["transform={method: hadamard}"],
    "rotation-only-kl_top": ["transform.learn_scaling=false"],
    "rotation+scaling-kl_top": [],
    "rotation+scaling-mse": ["transform.loss=mse"],
    "rotation+scaling-ce": ["transform.loss=ce"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipe", default="configs/tests/stories260k-w4a4-ostquant.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="override for every row")
    args = ap.parse_args()
    rows = {}
    for label, own in ROWS.items():
        sets = [x for o in ["outliers.method=none", *args.overrides, *own] for x in ("--set", o)]
        run_dir = ROOT / "bench" / "out" / f"ablation-{Path(args.recipe).stem}-{label}"
        cmd = [sys.executable, "-m", "qtool", "quantize", "-r", args.recipe, "--run-dir", str(run_dir)]
        start = time.time()
        out = subprocess.run([*cmd, "--force", "--json", *sets], cwd=ROOT, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{label}: {' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
        stages = json.loads(out.stdout)["stages"]
        ev, tr = stages["evaluate"]["summary"], stages["transform"]["summary"]
        rows[label] = {
            "ppl": ev["ppl"],
            "fp_ppl": ev["fp_ppl"],
            "gap": ev["ppl"] - ev["fp_ppl"],
            "train_seconds": tr.get("train_seconds"),
            "loss_first": tr.get("loss_first"),
            "loss_last": tr.get("loss_last"),
            "orthogonality_error": tr.get("orthogonality_error"),
            "wall_seconds": round(time.time() - start, 1),
        }
        print(label, json.dumps(rows[label]), flush=True)
    base = rows["hadamard"]["gap"]
    for row in rows.values():
        row["gap_vs_hadamard"] = row["gap"] / base
    path = ROOT / "bench" / f"ostquant-ablation-{Path(args.recipe).stem}.json"
    path.write_text(json.dumps({"recipe": args.recipe, "overrides": args.overrides, "rows": rows}, indent=2) + "\n")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
