"""Recipes: YAML -> a frozen, validated ``Recipe``. Errors carry the YAML path of the offending field.

A recipe has one section per stage, each with a ``method:`` where the stage has several. ``scheme`` may name a
preset and override any of its fields. CLI overrides (``--set quantize.damp=0.02``) are applied to the raw YAML
before validation, so they are validated exactly like the file.
"""

from __future__ import annotations

import copy
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qtool.errors import QtoolError
from qtool.methods import quantize as quantize_methods
from qtool.methods import transform as transform_methods
from qtool.schemes import PRESETS, Scheme
from qtool.stages.calibrate import CalibrationConfig
from qtool.stages.evaluate import EvaluateConfig
from qtool.stages.outliers import OutliersConfig
from qtool.stages.pack import PackConfig

RECIPE_VERSION = 1


class ModelConfig(BaseModel):
    """The model: a local HF directory, a ``.gguf`` file (or a directory holding one), or a hub id."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str
    tokenizer: str | None = Field(None, description="tokenizer dir or hub id; default: the model's own")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False


class OutputConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    run_dir: str | None = Field(None, description="default: runs/<name>")

    @field_validator("run_dir")
    @classmethod
    def _safe_run_dir(cls, v: str | None) -> str | None:
        if v is not None and (".." in Path(v).parts or Path(v).expanduser().resolve() == Path("/")):
            raise ValueError(
                "a run directory must not climb out with '..' or be the filesystem root; use a path such as runs/<name>"
            )
        return v


class Recipe(BaseModel):
    """A whole run: model, calibration data, scheme and one section per stage."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = 1
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: ModelConfig
    calibration: CalibrationConfig
    scheme: Scheme
    outliers: OutliersConfig = OutliersConfig()
    transform: transform_methods.TransformConfig = transform_methods.NoTransform()
    quantize: quantize_methods.QuantizeConfig
    pack: PackConfig = PackConfig()
    evaluate: EvaluateConfig | None = Field(None, description="omit to quantize and pack without evaluating")
    output: OutputConfig = OutputConfig()

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, v: Any) -> Any:
        return {"source": v} if isinstance(v, str) else v

    @field_validator("scheme", mode="before")
    @classmethod
    def _scheme_preset(cls, v: Any) -> Any:
        """``scheme: W4A16`` or ``scheme: {preset: W4A16, weights: {group_size: 64}, ignore: [...]}``."""
        if isinstance(v, str):
            v = {"preset": v}
        if not isinstance(v, dict) or "preset" not in v:
            return v
        v = dict(v)
        name = v.pop("preset")
        if name not in PRESETS:
            raise ValueError(f"unknown preset '{name}'; use one of {', '.join(PRESETS)}")
        base = PRESETS[name].model_dump()
        for key, value in v.items():
            if key in ("weights", "input_activations", "kv_cache") and isinstance(value, dict) and base.get(key):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
        return base

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        transform_methods.method_for(self.transform).check_recipe(self)
        cal, ev = self.calibration, self.evaluate
        if ev is None:
            return self
        same = Path(cal.dataset).resolve() == Path(ev.dataset).resolve()
        if same and cal.span[0] < ev.span[1] and ev.span[0] < cal.span[1]:
            raise ValueError(
                "calibration.dataset and evaluate.dataset are the same text; calibrate on a validation split and "
                "evaluate on the test split, or give the two disjoint spans (e.g. [0, 0.5] and [0.5, 1])"
            )
        return self

    def run_dir(self) -> Path:
        return Path(self.output.run_dir or f"runs/{self.name}")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["quantize.damp=0.02", "scheme.weights.group_size=64"]`` -> a copy of ``raw`` with those keys set.
    Values are parsed as YAML scalars/flow collections (``true``, ``64``, ``[a, b]``)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise QtoolError(f"--set {item}: expected key=value, e.g. --set quantize.damp=0.02")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if isinstance(child, str) and part in ("model", "scheme"):
                child = {"source": child} if part == "model" else {"preset": child}
            node[part] = child if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None, model: str | None = None) -> Recipe:
    """Read, override and validate a recipe file. ``model`` replaces ``model.source`` (``--model``)."""
    p = Path(path)
    if not p.is_file():
        raise QtoolError(f"recipe: {path} does not exist; pass an existing YAML file (see recipes/)")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise QtoolError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from e
    if not isinstance(raw, dict):
        raise QtoolError(f"{path}: a recipe is a YAML mapping with keys version, name, model, ...; see recipes/")
    raw = apply_overrides(raw, (overrides or []) + ([f"model.source={model}"] if model else []))
    if "name" not in raw:
        raw["name"] = p.stem
    return validate_recipe(raw, str(path))


def validate_recipe(raw: dict[str, Any], origin: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise QtoolError(f"{origin}: {format_error(e)}") from None


def format_error(e: ValidationError) -> str:
    """The first error as ``dotted.path: what is wrong; the fix``; one line."""
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"] if not _is_union_tag(x))
    kind = err["type"]
    if kind == "extra_forbidden":
        msg = "unknown key; check the spelling (qtool schema lists the keys)"
    elif kind == "missing":
        msg = "required key is missing; add it"
    elif kind == "literal_error":
        msg = f"{err['msg'].replace('Input should be', 'must be')} (got {err.get('input')!r})"
    elif kind == "union_tag_invalid":
        msg = f"unknown method {err['input'].get('method')!r}; {err['ctx']['expected_tags']} are available"
        loc = loc or "method"
    elif kind == "union_tag_not_found":
        msg = f"needs a 'method:' key ({err['ctx']['discriminator']})"
    else:
        msg = err["msg"].removeprefix("Value error, ")
        if "input" in err and not isinstance(err["input"], dict | list):
            msg += f" (got {err['input']!r})"
    return f"{loc}: {msg}" if loc else msg


def _method_tags() -> frozenset[str]:
    """The ``method`` values of the method tables' configs (pydantic puts them in error locations)."""
    tags = set()
    for table in (transform_methods.METHODS, quantize_methods.METHODS):
        for config in table:
            tags.update(typing.get_args(config.model_fields["method"].annotation))
    return frozenset(tags)


_UNION_TAGS = _method_tags()


def _is_union_tag(x: Any) -> bool:
    return isinstance(x, str) and (x in _UNION_TAGS or x.startswith("function-after["))


def recipe_schema() -> dict[str, Any]:
    return Recipe.model_json_schema()
