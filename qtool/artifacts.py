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
    """The open, uncommitted directory of one stage. ``path`` is where the stage writes its files."""

    def __init__(self, final: Path, fingerprint: str):
        self.final = final
        self.path = final.with_name(final.name + ".tmp")
        self.fingerprint = fingerprint
        self._started = time.time()
        marker = self.path / ".fingerprint"
        if self.path.exists() and (not marker.is_file() or marker.read_text() != fingerprint):
            shutil.rmtree(self.path)  # leftovers of a different config: nothing in them is reusable
        self.path.mkdir(parents=True, exist_ok=True)
        marker.write_text(fingerprint)

    def commit(self, info: dict[str, Any]) -> dict[str, Any]:
        """Hash every file, write the manifest last, and move the directory into place."""
        files = {
            str(p.relative_to(self.path)): sha256_file(p)
            for p in sorted(self.path.rglob("*"))
            if p.is_file() and p.name != ".fingerprint" and not p.name.endswith(".part")
        }
        manifest = {
            "stage": self.final.name,
            "fingerprint": self.fingerprint,
            "files": files,
            "started": self._started,
            "seconds": round(time.time() - self._started, 3),
            **info,
        }
        (self.path / ".fingerprint").unlink()
        write_json(self.path / MANIFEST, manifest)
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.path, self.final)
        return manifest


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
    """Raise ``ArtifactError`` naming the first file that is missing or whose sha256 differs from the manifest."""
    for rel, digest in manifest["files"].items():
        p = stage_dir / rel
        if not p.is_file():
            raise ArtifactError(f"{p} is missing; rerun with --from-stage {_stage_name(stage_dir)}")
        if sha256_file(p) != digest:
            raise ArtifactError(
                f"{p} does not match its manifest (truncated or edited); "
                f"rerun with --from-stage {_stage_name(stage_dir)} to recompute it"
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
