"""`make bench`: quantize SmolLM2 (or MODEL) with the shipped recipes and record time, memory, size, ppl.

Each row runs as its own ``qtool quantize --json --force`` process, so peak RSS (``os.wait4``) is that run's
alone. Writes ``bench/results.json`` (``--only`` reruns some rows and keeps the others) and prints a table. Every
row evaluates with the same token budget (the recipes' ``evaluate`` sections are identical). Numbers from one run
on one machine: compare ratios within a run, not absolute seconds across machines.

``--seeds 1 2`` reruns the seeded rows (randomized Hadamards, OSTQuant) as ``<row>-seed<N>`` rows beside the
seed-0 row; ``--add ROW=RUN_DIR[:TIME_LOG] --note "..."`` records a run made by hand (e.g. ``qtool quantize`` with
``OMP_NUM_THREADS=1`` under ``/usr/bin/time -v``, two runs side by side) from its stage manifests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from qtool.methods import transform as transform_methods
from qtool.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
PER_CHANNEL = ["scheme.weights.granularity=channel", "scheme.weights.group_size=null"]
W6A6 = ["scheme.weights.bits=6", "scheme.input_activations.bits=6"]
W6A6_DYNAMIC = ["scheme.input_overrides={'re:.*(o_proj|down_proj)': {bits: 6, granularity: token, dynamic: true}}"]
# label -> (recipe, recipe overrides)
ROWS: dict[str, tuple[str, list[str]]] = {
    "w4a16-rtn": ("recipes/w4a16-rtn.yaml", []),
    "w4a16-gptq": ("recipes/w4a16-gptq.yaml", []),
    # QuaRot-style W4A16: R1/R2 Hadamards fused into the weights (no online op, as w4a16-ostquant), then GPTQ
    "w4a16-hadamard-gptq": (
        "recipes/w4a16-gptq.yaml",
        ["transform={method: hadamard, rotations: [r1, r2], random: true, seed: 0}"],
    ),
    "w4a4kv4-rtn": ("recipes/w4a4-rtn.yaml", []),
    "w4a4kv4-hadamard-rtn": ("recipes/w4a4-quarot.yaml", ["quantize={method: rtn}"]),
    "w4a4kv4-hadamard-gptq": ("recipes/w4a4-quarot.yaml", []),
    "w8a8-smoothquant-gptq": ("recipes/w8a8-smoothquant.yaml", []),
    "w8a8-smoothquant-rtn": ("recipes/w8a8-smoothquant.yaml", ["quantize={method: rtn}", "outliers.method=none"]),
    # static per-tensor input scales (issue 17): all linears, and static q/k/v/gate/up with dynamic o/down
    "w8a8-static-smoothquant-gptq": ("recipes/w8a8-smoothquant-static.yaml", []),
    "w8a8-static-smoothquant-rtn": (
        "recipes/w8a8-smoothquant-static.yaml",
        ["quantize={method: rtn}", "outliers.method=none"],
    ),
    "w8a8-static-qkv-gateup-smoothquant-rtn": (
        "recipes/w8a8-smoothquant-static.yaml",
        [
            "quantize={method: rtn}",
            "outliers.method=none",
            "scheme.input_overrides={'re:.*(o_proj|down_proj)': {bits: 8, granularity: token, dynamic: true}}",
        ],
    ),
    # OutlierTune (issue 17) against SmoothQuant, static scales; W6A6: weights, static and dynamic inputs at 6 bits
    "w8a8-outliertune-rtn": ("recipes/w8a8-outliertune.yaml", []),
    "w6a6-outliertune-rtn": ("recipes/w8a8-outliertune.yaml", [*W6A6, *W6A6_DYNAMIC]),
    "w6a6-outliertune-nosym-rtn": (
        "recipes/w8a8-outliertune.yaml",
        [*W6A6, *W6A6_DYNAMIC, "transform.symmetrize=false"],
    ),
    "w6a6-static-qkv-gateup-smoothquant-rtn": (
        "recipes/w8a8-smoothquant-static.yaml",
        ["quantize={method: rtn}", "outliers.method=none", *W6A6, *W6A6_DYNAMIC],
    ),
    "w6a6-static-smoothquant-rtn": (
        "recipes/w8a8-smoothquant-static.yaml",
        ["quantize={method: rtn}", "outliers.method=none", *W6A6],
    ),
    # the recipe's student keeps FP weights for GPTQ; with RTN weights the student trains against RTN
    "w4a4kv4-ostquant-rtn": (
        "recipes/w4a4-ostquant.yaml",
        ["quantize={method: rtn}", "transform.train_weight_quant=true"],
    ),
    "w4a4kv4-ostquant-gptq": ("recipes/w4a4-ostquant.yaml", []),
    "w4a16-ostquant-gptq": ("recipes/w4a16-ostquant.yaml", []),
    # weight methods at W3 (SmolLM2's weights already sit on a 4-bit grid), g64 and per channel
    "w4a16-quantease": ("recipes/w4a16-quantease.yaml", []),
    "w3a16-rtn-g64": ("recipes/w4a16-rtn.yaml", ["scheme.weights.bits=3"]),
    "w3a16-gptq-g64": ("recipes/w4a16-gptq.yaml", ["scheme.weights.bits=3"]),
    "w3a16-quantease-g64": ("recipes/w4a16-quantease.yaml", ["scheme.weights.bits=3"]),
    "w3a16-rtn-channel": ("recipes/w4a16-rtn.yaml", ["scheme.weights.bits=3", *PER_CHANNEL]),
    "w3a16-gptq-channel": ("recipes/w4a16-gptq.yaml", ["scheme.weights.bits=3", *PER_CHANNEL]),
    "w3a16-quantease-channel": ("recipes/w4a16-quantease.yaml", ["scheme.weights.bits=3", *PER_CHANNEL]),
    # GWQ at W3 g64, 1% kept, RTN on the rest: the paper's gradient saliency against |W| and W^2 * H_jj
    "w3a16-gwq-grad-rtn": ("recipes/w4a16-gwq.yaml", ["scheme.weights.bits=3", "quantize.base=rtn"]),
    "w3a16-gwq-grad-rtn-gseed1": (
        "recipes/w4a16-gwq.yaml",
        ["scheme.weights.bits=3", "quantize.base=rtn", "quantize.gradient_seed=1"],
    ),
    "w3a16-gwq-weight-rtn": (
        "recipes/w4a16-gwq.yaml",
        ["scheme.weights.bits=3", "quantize.base=rtn", "quantize.saliency=weight"],
    ),
    "w3a16-gwq-hessian-rtn": (
        "recipes/w4a16-gwq.yaml",
        ["scheme.weights.bits=3", "quantize.base=rtn", "quantize.saliency=hessian"],
    ),
    "w3a16-gwq-grad-gptq": ("recipes/w4a16-gwq.yaml", ["scheme.weights.bits=3"]),
    "w3a16-gwq-weight-gptq": ("recipes/w4a16-gwq.yaml", ["scheme.weights.bits=3", "quantize.saliency=weight"]),
    # AdaDim at W3 asymmetric g64 (the paper's grids) against the same base method on today's axis alone
    "w3a16-asym-rtn-g64": ("recipes/w4a16-adadim.yaml", ["scheme.weights.bits=3", "quantize={method: rtn}"]),
    "w3a16-asym-adadim-rtn-g64": ("recipes/w4a16-adadim.yaml", ["scheme.weights.bits=3", "quantize.base=rtn"]),
    "w3a16-asym-gptq-g64": ("recipes/w4a16-adadim.yaml", ["scheme.weights.bits=3", "quantize={method: gptq}"]),
    "w3a16-asym-adadim-gptq-g64": ("recipes/w4a16-adadim.yaml", ["scheme.weights.bits=3"]),
    # AWQ (asymmetric g64, 128 x 512 WikiText-2 valid: the same windows as the w3a16-asym-* rows above), with each
    # part switched off in turn, and AWQ + GPTQ
    "w4a16-asym-rtn-g64": ("recipes/w4a16-awq.yaml", ["quantize={method: rtn}"]),
    "w4a16-asym-gptq-g64": ("recipes/w4a16-awq.yaml", ["quantize={method: gptq}"]),
    "w4a16-awq": ("recipes/w4a16-awq.yaml", []),
    # the budget of the llm-compressor comparison (docs/methods/awq.md): 16 x 512 windows
    "w4a16-awq-16x512": ("recipes/w4a16-awq.yaml", ["calibration.n_samples=16"]),
    "w4a16-awq-noclip": ("recipes/w4a16-awq.yaml", ["quantize.clip=false"]),
    "w4a16-awq-novo": ("recipes/w4a16-awq.yaml", ["quantize.mappings=[qkv, gate_up, down_proj]"]),
    "w4a16-awq-gptq": ("recipes/w4a16-awq-gptq.yaml", []),
    "w3a16-awq": ("recipes/w4a16-awq.yaml", ["scheme.weights.bits=3"]),
    "w3a16-awq-noclip": ("recipes/w4a16-awq.yaml", ["scheme.weights.bits=3", "quantize.clip=false"]),
    "w3a16-awq-novo": (
        "recipes/w4a16-awq.yaml",
        ["scheme.weights.bits=3", "quantize.mappings=[qkv, gate_up, down_proj]"],
    ),
    "w3a16-awq-gptq": ("recipes/w4a16-awq-gptq.yaml", ["scheme.weights.bits=3"]),
    # the issue's first calibration budget, 32 x 2048 WikiText-2 valid (the rows above: the anchors' 128 x 512; the
    # same 65,536 tokens in longer windows); RTN uses no calibration, so its rows above stand for both
    **{
        f"{label}-32x2048": (recipe, [*extra, "calibration.n_samples=32", "calibration.seqlen=2048"])
        for label, (recipe, extra) in {
            "w4a16-asym-gptq-g64": ("recipes/w4a16-awq.yaml", ["quantize={method: gptq}"]),
            "w4a16-awq": ("recipes/w4a16-awq.yaml", []),
            "w4a16-awq-gptq": ("recipes/w4a16-awq-gptq.yaml", []),
            "w3a16-asym-gptq-g64": ("recipes/w4a16-awq.yaml", ["scheme.weights.bits=3", "quantize={method: gptq}"]),
            "w3a16-awq": ("recipes/w4a16-awq.yaml", ["scheme.weights.bits=3"]),
            "w3a16-awq-gptq": ("recipes/w4a16-awq-gptq.yaml", ["scheme.weights.bits=3"]),
        }.items()
    },
}


def draws_from_seed(recipe: str, overrides: list[str]) -> bool:
    """Whether the row's resolved transform depends on ``transform.seed``: randomized Hadamards, and OSTQuant (which
    starts from its seed's Hadamard and samples its training windows with it)."""
    transform = load_recipe(ROOT / recipe, overrides).transform
    return transform_methods.method_for(transform).draws_from_seed(transform)


# `--seeds` reruns these rows as `<row>-seed<N>` rows with `transform.seed=N`, kept beside the seed-0 row
SEEDED = {lab for lab, (recipe, extra) in ROWS.items() if draws_from_seed(recipe, extra)}


def split_label(label: str) -> tuple[str, int | None]:
    """``"w4a16-ostquant-gptq-seed1"`` -> ``("w4a16-ostquant-gptq", 1)``; a plain row -> ``(label, None)``."""
    base, sep, seed = label.rpartition("-seed")
    if sep and seed.isdigit() and base in SEEDED:
        return base, int(seed)
    return label, None


def overrides(label: str) -> list[str]:
    """The row's own recipe overrides (``transform.seed`` last for a seed row)."""
    base, seed = split_label(label)
    return [*ROWS[base][1], *([f"transform.seed={seed}"] if seed is not None else [])]


def ordered(rows: dict[str, dict]) -> list[dict]:
    """Rows in ``ROWS`` order, each row's seed variants after it."""
    by_base = sorted(rows, key=lambda lab: split_label(lab)[1] or 0)
    return [rows[lab] for base in ROWS for lab in by_base if split_label(lab)[0] == base]


def run_one(label: str, model: str, out_dir: Path, extra: list[str]) -> dict:
    recipe = ROWS[split_label(label)[0]][0]
    extra = [x for o in overrides(label) for x in ("--set", o)] + extra
    run_dir = out_dir / label
    cmd = [
        sys.executable,
        "-m",
        "qtool",
        "quantize",
        "--recipe",
        recipe,
        "--model",
        model,
        "--run-dir",
        str(run_dir),
        "--force",
        "--json",
        *extra,
    ]
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd)} failed with exit code {proc.returncode}")
    return row(label, json.loads(stdout)["stages"], run_dir, time.time() - start, usage.ru_maxrss / 1024)


def row(label: str, summary: dict, run_dir: Path, wall_seconds: float, peak_rss_mb: float | None) -> dict:
    """One results.json row from a run's ``--json`` stage summaries (also used to add rows measured by hand)."""
    recipe = ROWS[split_label(label)[0]][0]
    ev, pack, q = summary["evaluate"]["summary"], summary["pack"]["summary"], summary["quantize"]
    recipe_yaml = (run_dir / "recipe.yaml").read_text()
    transform = summary["transform"]["summary"] or {}
    outliers = summary["outliers"]["summary"] or {}
    return {
        "label": label,
        "recipe": recipe,
        "overrides": overrides(label),
        "transform_seconds": summary["transform"]["seconds"],
        "outliers_worst": outliers.get("worst", [])[:5],
        "before_after": transform.get("before_after", [])[:5],
        "ostquant": {k: transform[k] for k in ("loss_first", "loss_last", "train_seconds", "orthogonality_error")}
        if "loss_first" in transform  # a training transform's summary
        else None,
        "quantize_seconds": q["seconds"],
        "calibrate_seconds": summary["calibrate"]["seconds"],
        "pipeline_wall_seconds": round(wall_seconds, 1),
        "peak_rss_mb": round(peak_rss_mb, 1) if peak_rss_mb is not None else None,
        "packed_bytes": pack["bytes"],
        "bf16_bytes": pack["bf16_bytes"],
        "packed_vs_bf16": round(pack["bytes"] / pack["bf16_bytes"], 4),
        "quantized_linear_bytes": pack["quantized_linear_bytes"],
        "quantized_linear_vs_bf16": round(pack["quantized_linear_bytes"] / pack["quantized_linear_bf16_bytes"], 4),
        "effective_bits": pack.get("effective_bits"),  # per quantized weight: ints, scales, zero points, outliers
        "ppl": ev["ppl"],
        "fp_ppl": ev.get("fp_ppl"),
        "eval_seqlen": ev["seqlen"],
        "eval_tokens": ev["tokens"],
        "resolved_recipe": recipe_yaml,
    }


def stages_of(run_dir: Path) -> dict:
    """A finished run's stage summaries as ``qtool quantize --json`` prints them, read from its stage manifests."""
    stages = {}
    for manifest in sorted(run_dir.glob("[0-9][0-9]-*/manifest.json")):
        m = json.loads(manifest.read_text())
        stages[m["stage"].split("-", 1)[1]] = {"seconds": m["seconds"], "summary": m["summary"]}
    return stages


def time_log(path: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) from a GNU ``/usr/bin/time -v`` log."""
    text = path.read_text()
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if not wall or not rss:
        raise SystemExit(f"bench: {path} is not a /usr/bin/time -v log")
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.group(1).split(":"))))
    return seconds, int(rss.group(1)) / 1024


def added_row(spec: str, note: str | None) -> tuple[str, dict]:
    """``LABEL=RUN_DIR[:TIME_LOG]``: a row from a run made by hand (e.g. two single-thread runs side by side)."""
    label, _, rest = spec.partition("=")
    run_dir, _, log = rest.partition(":")
    if split_label(label)[0] not in ROWS or not (Path(run_dir) / "06-evaluate" / "manifest.json").is_file():
        raise SystemExit(f"bench: --add {spec}: want <row>[-seed<N>]=<finished run dir>[:<time -v log>]")
    stages = stages_of(Path(run_dir))
    wall, rss = time_log(Path(log)) if log else (sum(s["seconds"] for s in stages.values()), None)
    r = row(label, stages, Path(run_dir), wall, rss)
    return label, {**r, "conditions": note} if note else r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="../shared/assets/models/smollm2-135m-instruct-q4_1-gguf")
    ap.add_argument("--out", default="bench/results.json")
    ap.add_argument("--only", nargs="*", default=list(ROWS), choices=list(ROWS), help="rows to (re)run")
    ap.add_argument(
        "--seeds",
        nargs="*",
        type=int,
        default=[],
        help="run the seeded rows of --only with these transform seeds, as <row>-seed<N> (0: the plain row); seeded: "
        + ", ".join(sorted(SEEDED)),
    )
    ap.add_argument(
        "--add",
        nargs="*",
        default=[],
        metavar="ROW=RUN_DIR[:TIME_LOG]",
        help="record runs made by hand (the row's recipe and overrides) instead of running --only",
    )
    ap.add_argument("--note", help="how the --add runs were made (stored as the rows' conditions)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override for every run")
    args = ap.parse_args()
    extra = [x for o in args.overrides for x in ("--set", o)]
    import torch

    from qtool.artifacts import write_json

    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch_threads": torch.get_num_threads()}
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.is_file() else {}
    kept = {r.get("label", Path(r["recipe"]).stem): r for r in old.get("runs", []) if old.get("model") == args.model}
    done: list[str] = []
    if args.add:
        added = dict(added_row(spec, args.note) for spec in args.add)
        kept.update(added)
        rows = ordered(kept)
        date = time.strftime("%Y-%m-%d %H:%M")
        doc = {"model": args.model, "machine": old.get("machine", machine), "date": date, "rerun": list(added)}
        write_json(out, {**doc, "runs": rows})
        args.only = []
    seeds = args.seeds or [0]
    labels = [f"{lab}-seed{n}" if n else lab for lab in args.only for n in seeds if not n or lab in SEEDED]
    rows = ordered(kept)
    for label in labels:  # results.json is rewritten after every row: a killed bench keeps what it measured
        kept[label] = run_one(label, args.model, ROOT / "bench" / "out", extra)
        done.append(label)
        rows = ordered(kept)
        date = time.strftime("%Y-%m-%d %H:%M")
        write_json(out, {"model": args.model, "machine": machine, "date": date, "rerun": done, "runs": rows})
    print(f"{'row':28} {'quantize s':>10} {'peak RSS MB':>11} {'packed MB':>9} {'vs bf16':>7} {'ppl':>8} {'FP ppl':>8}")
    for r in rows:
        print(
            f"{r.get('label', r['recipe']):28} {r['quantize_seconds']:>10.1f} {r['peak_rss_mb'] or 0:>11.0f} "
            f"{r['packed_bytes'] / 1e6:>9.1f} {r['packed_vs_bf16']:>7.3f} {r['ppl']:>8.3f} {r['fp_ppl'] or 0:>8.3f}"
        )
    print(f"(eval: seqlen {rows[0]['eval_seqlen']}, {rows[0]['eval_tokens']} predicted tokens) -> {args.out}")


if __name__ == "__main__":
    main()
