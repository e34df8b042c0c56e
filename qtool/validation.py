"""``qtool validate``: check a recipe against the model's real shapes and the files it names, loading no weights."""

from __future__ import annotations

from pathlib import Path

import torch

from qtool.arch import decoder_layers, head_dim_of, spec_for
from qtool.errors import QtoolError
from qtool.formats.run_dir import refusal
from qtool.loading import check_finite, check_weight_files, load_config, load_tokenizer, resolve_source, scan_weights
from qtool.methods import quantize as quantize_methods
from qtool.methods import transform as transform_methods
from qtool.recipe import Recipe
from qtool.targets import plan_targets


def validate_fit(recipe: Recipe, run_dir: Path | None = None) -> str:
    """Raise ``QtoolError`` on the first problem; return a one-line description of what would be quantized.
    ``run_dir``: where the run would write (default: the recipe's)."""
    why = refusal(Path(run_dir or recipe.run_dir()))
    if why:
        raise QtoolError(f"--run-dir: {why}; choose a new or empty directory (nothing was written)")
    ev = recipe.evaluate
    files = [("calibration.dataset", recipe.calibration.dataset)] + ([("evaluate.dataset", ev.dataset)] if ev else [])
    for field, path in files:
        if not Path(path).is_file():
            raise QtoolError(f"{field}: file {path} does not exist; pass an existing text or jsonl file")
    if ev is not None and ev.tasks:
        from qtool.eval.tasks import task_files
        from qtool.stages.evaluate import task_data_dir

        for task in recipe.evaluate.tasks:  # a missing task file must not surface after quantization
            task_files(task, task_data_dir(recipe.evaluate))
    src = resolve_source(recipe.model.source, recipe.model.tokenizer)
    config = load_config(src, recipe.model.trust_remote_code)
    spec = spec_for(config)
    check_weight_files(src)
    transform_methods.method_for(recipe.transform).check_fit(recipe, spec, config)
    context = getattr(config, "max_position_embeddings", None)
    for field, seqlen in (
        ("calibration.seqlen", recipe.calibration.seqlen),
        ("evaluate.seqlen", ev.seqlen if ev else None),
    ):
        if context and seqlen and seqlen > context:
            raise QtoolError(f"{field}: {seqlen} exceeds the model's context of {context}; use ≤ {context}")
    model = meta_model(config, recipe.model.trust_remote_code)
    layers = decoder_layers(model, spec)
    plan = plan_targets(layers, spec, recipe.scheme)
    quantize_methods.method_for(recipe.quantize).check_plan(recipe.quantize, recipe.scheme, spec, layers, plan)
    _check_dynamic_groups(recipe, plan, config)
    n = sum(len(row) for row in plan)
    fallback = sum(1 for row in plan for t in row if t.args != recipe.scheme.weights)
    extra = f", {fallback} with per-channel fallback" if fallback else ""
    return (
        f"{recipe.scheme.name} {recipe.quantize.method} on {n} linears in {len(plan)} layers{extra} "
        f"({spec.family} family, model {recipe.model.source})"
    )


def _check_dynamic_groups(recipe: Recipe, plan, config) -> None:
    """Group sizes of activation and KV-cache quantization must divide what they group."""
    a, kv = recipe.scheme.input_activations, recipe.scheme.kv_cache
    if a is not None and a.granularity == "group":
        for t in (t for row in plan for t in row):
            if t.in_features % a.group_size:
                raise QtoolError(
                    f"scheme.input_activations.group_size: {a.group_size} does not divide in_features="
                    f"{t.in_features} of layer {t.layer} {t.name}; use a divisor or granularity token"
                )
    if kv is not None and kv.granularity == "group":
        hd = head_dim_of(config)
        if hd % kv.group_size:
            raise QtoolError(
                f"scheme.kv_cache.group_size: {kv.group_size} does not divide head_dim={hd}; "
                "use a divisor of it or granularity head"
            )


def meta_model(config, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model's module tree with shapes but no storage (``meta`` device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def validate_deep(recipe: Recipe) -> None:
    """What ``qtool quantize`` checks once the model is loaded, without loading it: the tokenizer loads and fits
    the vocabulary, the texts hold enough tokens, and every weight is finite (read one tensor at a time)."""
    src = resolve_source(recipe.model.source, recipe.model.tokenizer)
    tokenizer = load_tokenizer(src, recipe.model.trust_remote_code)
    check_data(recipe, tokenizer, load_config(src, recipe.model.trust_remote_code))
    scan_weights(src)


def check_loaded(recipe: Recipe, model: torch.nn.Module, tokenizer) -> None:
    """The loaded model and tokenizer, before any stage writes: finite weights and texts that fit."""
    check_finite(model)
    check_data(recipe, tokenizer, model.config)


def check_data(recipe: Recipe, tokenizer, config) -> None:
    """The tokenizer's ids fit the model's embedding; the calibration text yields windows of ``calibration.seqlen``
    and the evaluation text at least one window within ``evaluate.max_tokens``."""
    from qtool.data import load_text, tokenize

    vocab = getattr(config, "vocab_size", None)
    if vocab and len(tokenizer) > vocab:
        field = "model.tokenizer" if recipe.model.tokenizer else "model"
        raise QtoolError(
            f"{field}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary {vocab}; "
            "use the model's own tokenizer"
        )
    cal = recipe.calibration
    ids = tokenize(tokenizer, load_text(cal.dataset, cal.format, cal.text_field, "calibration.dataset", cal.span))
    if ids.numel() <= cal.seqlen:
        raise QtoolError(
            f"calibration.seqlen: {cal.seqlen} tokens requested but calibration.dataset gives only {ids.numel()}; "
            "lower seqlen or use a larger file"
        )
    ev = recipe.evaluate
    if ev is None:
        return
    context = getattr(config, "max_position_embeddings", None) or 2048
    seqlen = ev.seqlen or min(2048, context)
    ids = tokenize(tokenizer, load_text(ev.dataset, ev.format, ev.text_field, "evaluate.dataset", ev.span))
    windows = min(ids.numel() // seqlen, (ev.max_tokens or ids.numel()) // seqlen)
    if windows < 1:
        raise QtoolError(
            f"evaluate: {ids.numel()} tokens of evaluate.dataset and a budget of {ev.max_tokens} give no full window "
            f"of {seqlen}; raise evaluate.max_tokens or lower evaluate.seqlen"
        )
