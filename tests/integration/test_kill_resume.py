"""Kill -9 and resume: a run killed at a random point of its progress (plus up to a second), or exactly at an
artifact write (the atomic rename that publishes a file or commits a stage: ``strace`` injects SIGKILL at that
syscall), resumes to packed files byte-identical to an uninterrupted run's, with no stray file anywhere in the run
directory.

The short form (two trials per recipe, a weight-only and a W4A4 recipe) runs in CI; ``-m slow`` runs the long form
(30 trials per recipe for W4A16-GPTQ, W4A4-QuaRot and W4A4-OSTQuant, a third of them injected at writes).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from qtool.artifacts import read_manifest, verify
from qtool.formats.run_dir import STAGE_DIRS, packed_model_dir
from tests.conftest import ROOT, STORIES, STORIES_RECIPE, TINYSTORIES, require, write_recipe

RECIPES = {
    "w4a16-gptq": STORIES_RECIPE,
    "w4a4-quarot": ROOT / "configs" / "tests" / "stories260k-w4a4-quarot.yaml",
    "w4a4-ostquant": ROOT / "configs" / "tests" / "stories260k-w4a4-ostquant.yaml",
}
RENAMES = "rename,renameat,renameat2"


# Injected kills land on the N-th rename, N uniform in 1..WRITES: every file qtool writes and every stage commit is
# published by a rename, and an uninterrupted run of these recipes makes 47 (W4A16) to 80 (W4A4 with outlier plots)
# of them; a resumed run makes fewer, so a later attempt may finish (a trial counts the kills that landed).
WRITES = 40


@dataclass
class Reference:
    recipe: Path
    hashes: dict[str, str]
    files: int  # in the run directory of an uninterrupted run: the progress scale random kills are drawn on


def _cmd(recipe: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "qtool", "quantize", "--recipe", str(recipe), "--run-dir", str(run_dir)]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _strace(*extra: str) -> list[str]:
    return ["strace", "-f", "-qq", "-e", "signal=none", "-e", f"trace={RENAMES}", *extra]


def _packed_hashes(run_dir: Path) -> dict[str, str]:
    model = packed_model_dir(run_dir)
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model.iterdir())}


def _reference(name: str, tmp: Path) -> Reference:
    require(STORIES, TINYSTORIES)
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    recipe = write_recipe(tmp / f"{name}.yaml", base=RECIPES[name], name=name)
    run_dir = tmp / "reference"
    proc = subprocess.run(_cmd(recipe, run_dir), env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return Reference(recipe, _packed_hashes(run_dir), _files(run_dir))


def _files(run_dir: Path) -> int:
    """Files under ``run_dir`` now (0 while a directory is being renamed under the walk)."""
    try:
        return sum(1 for p in run_dir.rglob("*") if p.is_file()) if run_dir.is_dir() else 0
    except OSError:
        return 0


_REFERENCES: dict[str, Reference] = {}


@pytest.fixture
def reference(tmp_path_factory):
    def get(name: str) -> Reference:
        if name not in _REFERENCES:
            _REFERENCES[name] = _reference(name, tmp_path_factory.mktemp(name))
        return _REFERENCES[name]

    return get


def _kill(ref: Reference, run_dir: Path, kind: str, rng: random.Random) -> bool:
    """One killed attempt; returns whether a kill landed (a run can finish before its random moment)."""
    if kind == "write":
        when = rng.randint(1, WRITES)
        cmd = [
            *_strace("-o", os.devnull, "-e", f"inject={RENAMES}:signal=KILL:when={when}"),
            *_cmd(ref.recipe, run_dir),
        ]
        proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
        return proc.returncode != 0
    # a random point of the run's progress (files it has written, which does not depend on how loaded the machine
    # is), then a random moment after it: the kill lands inside whatever the run computes next
    target = _files(run_dir) + rng.randint(1, max(1, ref.files - _files(run_dir)))
    delay = rng.uniform(0.0, 1.0)
    proc = subprocess.Popen(_cmd(ref.recipe, run_dir), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 900
    while proc.poll() is None and _files(run_dir) < target and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    if proc.poll() is not None:
        return False  # finished first: no kill
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def _assert_clean(run_dir: Path) -> None:
    """Every stage committed and verified (no file its manifest does not list), no uncommitted stage directory,
    no leftover of an interrupted write anywhere."""
    leftovers = [p for p in run_dir.rglob("*") if p.name.endswith((".part", ".tmp")) or p.name.startswith(".")]
    assert not leftovers, leftovers
    for dirname in STAGE_DIRS.values():
        manifest = read_manifest(run_dir / dirname)
        assert manifest is not None, dirname
        verify(run_dir / dirname, manifest)


def trial(ref: Reference, run_dir: Path, kind: str, seed: int, kills: int = 1) -> int:
    """``kills`` killed attempts in a row, then a resume to completion; returns the kills that landed."""
    rng = random.Random(seed)
    landed = sum(_kill(ref, run_dir, kind, rng) for _ in range(kills))
    proc = subprocess.run(_cmd(ref.recipe, run_dir), env=_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _packed_hashes(run_dir) == ref.hashes
    _assert_clean(run_dir)
    return landed


@pytest.mark.parametrize("name", ["w4a16-gptq", "w4a4-quarot"])
@pytest.mark.parametrize("kind", ["random", "write"])
def test_killed_run_resumes_bit_identical(reference, tmp_path, name, kind):
    ref = reference(name)
    landed = trial(ref, tmp_path / "run", kind, seed=zlib.crc32(f"{name}-{kind}".encode()))
    assert landed == 1  # the trial proved something


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPES))
def test_kill_harness_long(reference, tmp_path, name):
    """30 trials, 10 of them injected at artifact writes, one to three killed attempts each (a third of the
    attempts injected)."""
    ref = reference(name)
    landed = {"random": 0, "write": 0}
    for seed in range(30):
        kind = "write" if seed % 3 == 0 else "random"
        run_dir = tmp_path / f"run{seed}"
        landed[kind] += trial(ref, run_dir, kind, seed, kills=1 + (seed // 3) % 3)
        shutil.rmtree(run_dir)
    print(f"\nkill harness {name}: 30 trials resumed bit-identical, kills landed {landed}")
    assert sum(landed.values()) >= 30
