"""Generate docs/recipes.md from the recipe schema: ``python -m qtool.docs_gen docs/recipes.md``.

A test checks that the committed file equals what this prints, so the reference never drifts from the code.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from qtool.recipe import recipe_schema
from qtool.schemes import PRESETS

HEADER = """# Recipe reference

Generated from the recipe schema by `make schema-docs` (`python -m qtool.docs_gen docs/recipes.md`); do not edit.
`qtool schema` prints the same schema as JSON. Every section rejects unknown keys; CLI `--set key=value` overrides
are validated like the file. Relative paths resolve against the directory qtool runs in.
"""


def render() -> str:
    schema = recipe_schema()
    defs = schema["$defs"]
    out = [HEADER, "## Top level\n", _table(schema, defs)]
    for name, sub in sorted(defs.items()):
        out += [f"## `{name}`\n", (sub.get("description") or "").strip() + "\n", _table(sub, defs)]
    out.append("## Presets\n")
    out.append("| preset | weights | input activations | KV cache |\n|---|---|---|---|")
    for name, scheme in PRESETS.items():
        cells = [_args(scheme.weights), _args(scheme.input_activations), _args(scheme.kv_cache)]
        out.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _args(a: Any) -> str:
    if a is None:
        return "—"
    gran = f"group {a.group_size}" if a.granularity == "group" else a.granularity
    kind = ", dynamic" if a.dynamic else ""
    return f"int{a.bits}, {'symmetric' if a.symmetric else 'asymmetric'}, {gran}{kind}"


def _table(schema: dict[str, Any], defs: dict[str, Any]) -> str:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    required = set(schema.get("required", []))
    for key, prop in schema.get("properties", {}).items():
        default = "required" if key in required else f"`{prop.get('default')}`"
        desc = (prop.get("description") or "").replace("\n", " ")
        rows.append(f"| `{key}` | {_type(prop)} | {default} | {desc} |")
    return "\n".join(rows) + "\n"


def _type(prop: dict[str, Any]) -> str:
    if "$ref" in prop:
        return f"`{prop['$ref'].rsplit('/', 1)[-1]}`"
    if "enum" in prop:
        return " \\| ".join(f"`{v}`" for v in prop["enum"])
    if "const" in prop:
        return f"`{prop['const']}`"
    for key in ("anyOf", "oneOf"):
        if key in prop:
            return " or ".join(_type(p) for p in prop[key])
    if prop.get("type") == "array":
        items = prop.get("items") or prop.get("prefixItems") or {}
        return f"list of {_type(items) if isinstance(items, dict) else 'number'}"
    return prop.get("type", "any")


def main() -> None:
    text = render()
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
