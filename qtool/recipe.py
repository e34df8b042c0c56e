"""Recipes: YAML -> a frozen, validated ``Recipe``. Errors carry the YAML path of the offending field.

A recipe has one section per stage, each with a ``method:`` where the stage has several. ``scheme`` may name a
preset and override any of its fields. CLI overrides (``--set quantize.damp=0.02``) are applied to the raw YAML
before validation, so they are validated exactly like the file.
"""

from __future__ import annotations

import copy
import json
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

    @field_validator("version", mode="before")
    @classmethod
    def _version_is_a_number(cls, v: Any) -> Any:
        if isinstance(v, bool):  # YAML `true` equals 1 in Python
            raise ValueError("must be 1, the recipe format version")
        return v

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


def expand_scheme(v: Any) -> Any:
    """A scheme preset (``"W4A16"`` or ``{preset: W4A16, ...overrides}``) merged into the full scheme mapping
    (JSON values); anything else is returned as it is, for validation to judge."""
    if isinstance(v, str):
        v = {"preset": v}
    if not isinstance(v, dict) or "preset" not in v:
        return v
    v = dict(v)
    name = v.pop("preset")
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)}")
    base = PRESETS[name].model_dump(mode="json")
    for key, value in v.items():
        if key in ("weights", "input_activations", "kv_cache") and isinstance(value, dict) and base.get(key):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["quantize.damp=0.02", "scheme.weights.group_size=64"]`` -> a copy of ``raw`` with those keys set.
    Values are parsed as YAML scalars/flow collections (``true``, ``64``, ``[a, b]``)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise QtoolError(f"--set {item}: expected key=value, e.g. --set quantize.damp=0.02")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise QtoolError(f"--set {item}: '{key}' is not a dotted recipe key; e.g. --set quantize.damp=0.02")
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if isinstance(child, str) and part in ("model", "scheme"):
                child = {"source": child} if part == "model" else {"preset": child}
            node[part] = child if isinstance(child, dict) else {}
            node = node[part]
        try:
            node[parts[-1]] = _parse_yaml(value)
        except (yaml.YAMLError, RecursionError, QtoolError) as e:
            raise QtoolError(f"--set {item}: the value is not valid YAML; quote strings, e.g. --set {key}='...'") from e
    return raw


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, list | dict):
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key must be a scalar", key_node.start_mark
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}: give each key once", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise QtoolError("nested too deeply (over Python's recursion limit); a recipe is a few levels deep") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None, model: str | None = None) -> Recipe:
    """Read, override and validate a recipe file. ``model`` replaces ``model.source`` (``--model``)."""
    p = Path(path)
    if not p.is_file():
        raise QtoolError(f"recipe: {path} does not exist; pass an existing YAML file (see recipes/)")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QtoolError(
            f"{path}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); a recipe is YAML"
        ) from None
    try:
        raw = _parse_yaml(text)
    except QtoolError as e:
        raise QtoolError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())  # YAML messages span lines
        raise QtoolError(f"{path}{where}: not valid YAML ({problem}); fix the syntax") from e
    if not isinstance(raw, dict):
        raise QtoolError(f"{path}: a recipe is a YAML mapping with keys version, name, model, ...; see recipes/")
    raw = apply_overrides(raw, (overrides or []) + ([f"model.source={model}"] if model else []))
    if "name" not in raw:
        raw["name"] = p.stem
    return validate_recipe(raw, str(path))


def validate_recipe(raw: dict[str, Any], origin: str = "recipe") -> Recipe:
    """Validate a raw recipe mapping strictly: every value must have its field's type as YAML/JSON writes it
    (``n_samples: true`` or ``damp: "0.02"`` are errors, not coerced); lists are accepted where tuples are held."""
    try:
        raw = dict(raw)
        if isinstance(raw.get("model"), str):
            raw["model"] = {"source": raw["model"]}
        if "scheme" in raw:
            raw["scheme"] = expand_scheme(raw["scheme"])
        text = json.dumps(raw, default=str)  # YAML dates and the like become strings, which strict fields refuse
    except ValueError as e:
        raise QtoolError(f"{origin}: scheme: {e}") from None
    except RecursionError:
        raise QtoolError(f"{origin}: nested too deeply; a recipe is a few levels deep") from None
    try:
        return Recipe.model_validate_json(text, strict=True)
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
