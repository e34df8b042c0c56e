"""Run-directory artifacts: atomic stage directories with sha256 manifests.

A stage writes into ``NN-name.tmp/`` and is committed by writing ``manifest.json`` (last) and renaming the directory
to ``NN-name/`` with ``os.replace``. A run killed at any instant therefore leaves either a complete stage directory
or none. ``verify`` re-hashes every file, so a truncated or edited artifact is reported, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from qtool.errors import ArtifactError

MANIFEST = "manifest.json"
FINGERPRINT = ".fingerprint"  # in an uncommitted stage directory: the configuration its partial work belongs to


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file in the same directory, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write safetensors atomically; tensors are made contiguous and moved to CPU."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated headers/data
        raise ArtifactError(f"{path} is unreadable ({e}); delete it or rerun with --force") from e


class StageWriter:
    """The open, uncommitted directory of one stage. ``path`` is where the stage writes its files.

    ``resumable``: partial work of the same configuration (``.fingerprint`` matches) is kept for the stage to reuse
    (quantize's finished layers, OSTQuant's training checkpoint); any other stage starts from an empty directory, so
    nothing a killed attempt left can reach a commit."""

    def __init__(self, final: Path, fingerprint: str, resumable: bool = False):
        self.final = final
        self.path = final.with_name(final.name + ".tmp")
        self.fingerprint = fingerprint
        self._started = time.time()
        marker = self.path / FINGERPRINT
        if self.path.exists() and not (resumable and self._reusable(marker)):
            shutil.rmtree(self.path)  # leftovers of a different config or of a stage that does not resume
        self.path.mkdir(parents=True, exist_ok=True)
        marker.write_text(fingerprint)

    def _reusable(self, marker: Path) -> bool:
        """Partial work of this configuration: the marker matches, or a kill fell inside ``commit`` after the
        marker was removed (the manifest, written first, names the fingerprint)."""
        if marker.is_file():
            return marker.read_text() == self.fingerprint
        try:
            return json.loads((self.path / MANIFEST).read_text()).get("fingerprint") == self.fingerprint
        except (OSError, ValueError, AttributeError):
            return False

    def commit(self, info: dict[str, Any]) -> dict[str, Any]:
        """Drop strays of killed writes, hash every file, write the manifest, and move the directory into place.
        Until the final ``os.replace`` the directory is still the reusable partial work of this configuration."""
        for p in list(self.path.rglob("*")):
            if p.is_file() and _stray(p) and p.name != FINGERPRINT:
                p.unlink()
        files = {
            str(p.relative_to(self.path)): sha256_file(p)
            for p in sorted(self.path.rglob("*"))
            if p.is_file() and p.name not in (FINGERPRINT, MANIFEST)
        }
        manifest = {
            "stage": self.final.name,
            "fingerprint": self.fingerprint,
            "files": files,
            "started": self._started,
            "seconds": round(time.time() - self._started, 3),
            **info,
        }
        write_json(self.path / MANIFEST, manifest)
        (self.path / FINGERPRINT).unlink()
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.path, self.final)
        return manifest


def _stray(path: Path) -> bool:
    """Leftovers of an interrupted atomic write: our ``.part`` files, safetensors' hidden ``.tmp*`` files (qtool
    writes no other hidden files)."""
    return path.name.endswith(".part") or path.name.startswith(".")


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    """The manifest of a committed stage, or None when the stage has not completed."""
    path = stage_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is corrupt ({e.msg}); rerun with --from-stage or --force") from e


def verify(stage_dir: Path, manifest: dict[str, Any]) -> None:
    """Raise ``ArtifactError`` naming the first file that is missing, differs from its sha256 in the manifest, or
    is not listed in the manifest at all (added after the stage committed: it would ship with the stage)."""
    for rel, digest in manifest["files"].items():
        p = stage_dir / rel
        if not p.is_file():
            raise ArtifactError(f"{p} is missing; rerun with --from-stage {_stage_name(stage_dir)}")
        if sha256_file(p) != digest:
            raise ArtifactError(
                f"{p} does not match its manifest (truncated or edited); "
                f"rerun with --from-stage {_stage_name(stage_dir)} to recompute it"
            )
    listed = set(manifest["files"]) | {MANIFEST}
    for p in sorted(stage_dir.rglob("*")):
        if p.is_file() and str(p.relative_to(stage_dir)) not in listed:
            raise ArtifactError(
                f"{p} is not part of the stage (added after it was written); remove it or rerun with --from-stage "
                f"{_stage_name(stage_dir)}"
            )


def _stage_name(stage_dir: Path) -> str:
    return stage_dir.name.split("-", 1)[-1]


class ArtifactReader:
    """Read-only access to committed upstream stages (``reader.path("quantize")``)."""

    def __init__(self, run_dir: Path, dirnames: dict[str, str]):
        self.run_dir = run_dir
        self._dirnames = dirnames

    def path(self, stage: str) -> Path:
        return self.run_dir / self._dirnames[stage]

    def manifest(self, stage: str) -> dict[str, Any]:
        m = read_manifest(self.path(stage))
        if m is None:
            raise ArtifactError(f"stage '{stage}' has not completed in {self.run_dir}; rerun without --from-stage")
        return m

    def json(self, stage: str, name: str) -> Any:
        return json.loads((self.path(stage) / name).read_text())

    def tensors(self, stage: str, name: str) -> dict[str, torch.Tensor]:
        return load_tensors(self.path(stage) / name)
