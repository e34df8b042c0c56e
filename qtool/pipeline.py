"""The fixed pipeline: calibrate → outliers → transform → quantize → pack → evaluate, with skip and resume.

Each stage has a fingerprint = sha256(qtool version, model identity, the recipe sections the stage reads, the
previous stage's fingerprint). A stage whose committed manifest carries its current fingerprint and whose files
match their sha256 is not run again, only applied; the first stage that differs and every stage after it run.
The model is loaded only when some stage has to run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qtool import __version__
from qtool.arch import spec_for
from qtool.artifacts import ArtifactReader, StageWriter, read_manifest, verify, write_json
from qtool.context import Progress, StageContext, no_progress
from qtool.errors import ArtifactError, QtoolError
from qtool.formats.run_dir import RECIPE, RUN_JSON, STAGE_DIRS, STAGE_ORDER
from qtool.loading import load_model, model_identity, resolve_source
from qtool.recipe import Recipe
from qtool.stages.base import Stage
from qtool.stages.calibrate import Calibrate
from qtool.stages.evaluate import Evaluate
from qtool.stages.outliers import Outliers
from qtool.stages.pack import Pack
from qtool.stages.quantize import Quantize
from qtool.stages.transform import Transform
from qtool.validation import check_loaded, validate_fit

log = logging.getLogger(__name__)

STAGES: tuple[Stage, ...] = (Calibrate(), Outliers(), Transform(), Quantize(), Pack(), Evaluate())
STAGE_NAMES = tuple(s.name for s in STAGES)
assert STAGE_NAMES == STAGE_ORDER, "the run directory layout (qtool.formats.run_dir) lists the stages in this order"
CONFIG_SECTION = {"calibrate": "calibration"}  # stage name -> its recipe section, where they differ


@dataclass
class StageState:
    """Where one stage stands: ``done`` (committed, current), ``corrupt`` (hash mismatch), ``stale`` (committed
    with another fingerprint), ``partial`` (interrupted, checkpoints kept), ``pending`` (never ran)."""

    name: str
    status: str
    fingerprint: str
    manifest: dict[str, Any] | None = None
    ran: bool = False
    detail: str = ""


@dataclass
class RunResult:
    run_dir: Path
    stages: list[StageState] = field(default_factory=list)

    def manifest(self, stage: str) -> dict[str, Any] | None:
        return next(s.manifest for s in self.stages if s.name == stage)


def stage_index(name: str, option: str) -> int:
    if name not in STAGE_NAMES:
        raise QtoolError(f"{option}: unknown stage '{name}'; use one of {', '.join(STAGE_NAMES)}")
    return STAGE_NAMES.index(name)


def fingerprints(recipe: Recipe, identity: str) -> dict[str, str]:
    """Chained fingerprints of every stage for this recipe and model."""
    out, upstream = {}, ""
    dumped = recipe.model_dump(mode="json")
    for stage in STAGES:
        payload = {
            "qtool": __version__,
            "model": identity,
            "dtype": recipe.model.dtype,
            "sections": {s: dumped[s] for s in stage.sections_for(recipe)},
            "upstream": upstream,
        }
        upstream = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
        out[stage.name] = upstream
    return out


class Pipeline:
    """Runs a recipe into a run directory. ``notify(state)`` is called when a stage is skipped, starts or ends."""

    def __init__(
        self,
        recipe: Recipe,
        run_dir: Path | None = None,
        *,
        progress: Progress = no_progress,
        notify: Callable[[StageState], None] | None = None,
        force: bool = False,
        from_stage: str | None = None,
        until_stage: str | None = None,
    ):
        self.recipe = recipe
        self.run_dir = Path(run_dir or recipe.run_dir())
        self.progress = progress
        self.notify = notify or (lambda state: None)
        self.force = force
        self.from_idx = stage_index(from_stage, "--from-stage") if from_stage else len(STAGES)
        self.until_idx = stage_index(until_stage, "--until-stage") if until_stage else len(STAGES) - 1
        if self.from_idx < len(STAGES) and self.from_idx > self.until_idx:
            raise QtoolError(f"--from-stage {from_stage} comes after --until-stage {until_stage}; swap them")
        self.source = resolve_source(recipe.model.source, recipe.model.tokenizer)

    def run(self) -> RunResult:
        """Every input problem surfaces before anything is written: the recipe's fit and files
        (``validate_fit``), the run directory, then, when a stage has to run, the loaded model and tokenizer and the
        texts they will read (``check_loaded``)."""
        validate_fit(self.recipe, self.run_dir)
        identity = model_identity(self.source, self.recipe.model.trust_remote_code)
        previous = self._check_dir(identity)
        fps = fingerprints(self.recipe, identity)
        states = [self._state(s.name, fps[s.name]) for s in STAGES]
        first = 0 if self.force else min([i for i, st in enumerate(states) if st.status != "done"] + [self.from_idx])
        result = RunResult(self.run_dir, states)
        if first > self.until_idx:
            self._prepare_dir(identity, previous)
            for st in states[: self.until_idx + 1]:
                self.notify(st)
            return result
        model, tokenizer = load_model(self.source, self.recipe.model.dtype, self.recipe.model.trust_remote_code)
        check_loaded(self.recipe, model, tokenizer)
        self._prepare_dir(identity, previous)
        if self.force:
            states = result.stages = [self._state(s.name, fps[s.name]) for s in STAGES]
        for st in states[:first]:
            self.notify(st)
        base = dict(
            recipe=self.recipe,
            model=model,
            tokenizer=tokenizer,
            spec=spec_for(model.config),
            source=self.source,
            reader=ArtifactReader(self.run_dir, STAGE_DIRS),
            log=log,
            progress=self.progress,
            reference_model=lambda: load_model(
                self.source, self.recipe.model.dtype, self.recipe.model.trust_remote_code
            )[0],
            shared={"model_identity": identity},
        )
        for i, (stage, st) in enumerate(zip(STAGES, states, strict=True)):
            if i > self.until_idx:
                break
            ctx = StageContext(config=self._config(stage), out=None, generator=self._generator(i), **base)
            if i < first:
                stage.apply(ctx, st.manifest)
                continue
            self._run_stage(stage, st, ctx, fps)
        return result

    def _run_stage(self, stage: Stage, st: StageState, ctx: StageContext, fps: dict[str, str]) -> None:
        writer = StageWriter(self.run_dir / STAGE_DIRS[stage.name], st.fingerprint, resumable=stage.resumable)
        ctx.out = writer.path
        st.status, st.ran = "running", True
        self._update_run_json(st)
        self.notify(st)
        try:
            summary = stage.run(ctx)
        except BaseException as e:
            st.status, st.detail = "failed", f"{type(e).__name__}: {e}"
            self._update_run_json(st)
            raise
        idx = STAGE_NAMES.index(stage.name)
        upstream = fps[STAGE_NAMES[idx - 1]] if idx else ""
        st.manifest = writer.commit({"summary": summary, "upstream": upstream, "qtool_version": __version__})
        st.status = "done"
        self._update_run_json(st)
        self.notify(st)

    def _state(self, name: str, fp: str) -> StageState:
        path = self.run_dir / STAGE_DIRS[name]
        manifest = read_manifest(path)
        if manifest is None:
            partial = path.with_name(path.name + ".tmp").is_dir()
            return StageState(name, "partial" if partial else "pending", fp)
        if manifest["fingerprint"] != fp:
            return StageState(name, "stale", fp, manifest)
        try:
            verify(path, manifest)
        except ArtifactError as e:
            log.warning("%s; recomputing stage '%s'", e, name)
            return StageState(name, "corrupt", fp, manifest, detail=str(e))
        return StageState(name, "done", fp, manifest)

    def _check_dir(self, identity: str) -> dict[str, Any] | None:
        """The run directory's previous ``run.json`` (``None``: none yet); refuses, writing nothing, a corrupt one
        or another model's run unless ``--force``."""
        run_json = self.run_dir / RUN_JSON
        previous = _read_run_json(run_json) if run_json.is_file() else None
        if previous is None and run_json.is_file() and not self.force:
            raise QtoolError(f"--run-dir: {run_json} is corrupt; pass --force to start the run over")
        held = (previous or {}).get("model", {})
        if previous is not None and held.get("identity") != identity and not self.force:
            raise QtoolError(
                f"--run-dir: {self.run_dir} holds a run of another model ({held.get('source')}); "
                "pass --force to overwrite it or choose another --run-dir"
            )
        return previous

    def _prepare_dir(self, identity: str, previous: dict[str, Any] | None) -> None:
        run_json = self.run_dir / RUN_JSON
        if self.force:
            for name in STAGE_DIRS.values():
                for p in (self.run_dir / name, self.run_dir / f"{name}.tmp"):
                    if p.exists():
                        shutil.rmtree(p)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / RECIPE).write_text(self.recipe.to_yaml())
        state = previous if previous is not None and not self.force else {"stages": {}}
        state.update(
            qtool_version=__version__,
            recipe=self.recipe.name,
            model={"source": self.recipe.model.source, "identity": identity, "dtype": self.recipe.model.dtype},
        )
        write_json(run_json, state)

    def _update_run_json(self, st: StageState) -> None:
        run_json = self.run_dir / RUN_JSON
        state = json.loads(run_json.read_text())
        entry = {"status": st.status, "fingerprint": st.fingerprint, "updated": time.time()}
        if st.manifest:
            entry["seconds"] = st.manifest.get("seconds")
        if st.detail:
            entry["detail"] = st.detail
        state["stages"][st.name] = entry
        write_json(run_json, state)

    def _config(self, stage: Stage) -> Any:
        return getattr(self.recipe, CONFIG_SECTION.get(stage.name, stage.name))

    def _generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.recipe.calibration.seed * 1000 + index)


def _read_run_json(path: Path) -> dict[str, Any] | None:
    """``run.json`` as a mapping with a ``stages`` mapping, or ``None`` when it is not one (corrupt)."""
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    ok = isinstance(doc, dict) and isinstance(doc.get("stages", {}), dict) and isinstance(doc.get("model", {}), dict)
    return doc if ok else None


def run_status(run_dir: Path) -> list[dict[str, Any]]:
    """Each stage's state, time and fingerprint as recorded in the run directory (hashes re-checked)."""
    if not (run_dir / RUN_JSON).is_file():
        raise QtoolError(f"RUN_DIR: {run_dir} is not a qtool run directory (no run.json); pass runs/<name>")
    rows, upstream = [], ""
    for stage in STAGES:
        name = stage.name
        path = run_dir / STAGE_DIRS[name]
        manifest = read_manifest(path)
        row: dict[str, Any] = {"stage": name, "status": "pending", "seconds": None, "fingerprint": None}
        if manifest is None:
            tmp = path.with_name(path.name + ".tmp")
            if tmp.is_dir():
                progress = stage.partial_progress(tmp)
                row["status"] = f"partial ({progress})" if progress else "partial"
            rows.append(row)
            upstream = None
            continue
        row.update(seconds=manifest.get("seconds"), fingerprint=manifest["fingerprint"], status="done")
        if upstream is None or manifest.get("upstream", "") != upstream:
            row["status"] = "stale (upstream changed)"
        try:
            verify(path, manifest)
        except ArtifactError as e:
            row["status"] = f"corrupt: {e}"
        row["summary"] = manifest.get("summary", {})
        upstream = manifest["fingerprint"]
        rows.append(row)
    return rows
