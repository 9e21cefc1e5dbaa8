"""The target schema of an extraction: loading it (pydantic class or JSON Schema file), the prompt that describes it,
the schema generation is constrained to (dates, capped strings) and canonical JSON for comparing values.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import os
from dataclasses import dataclass
from typing import Any

from docpipe.config import ExtractOptions
from docpipe.errors import ConfigError, describe


PROMPT_TEMPLATE = (
    "Extract the information from this document as JSON matching the schema below. "
    "Use null for anything the document does not show; do not invent values.\n{fields}"
)


@dataclass(frozen=True)
class SchemaSpec:
    name: str
    json_schema: dict[str, Any]
    model: Any = None  # a pydantic model class, or None for a JSON Schema file
    # The top-level module the model came from when it was found in the working directory (not installed): Ray
    # workers, on this machine or another, may not see that folder, so the class travels to them by value.
    local_module: str | None = None

    @property
    def hash(self) -> str:
        canonical = json.dumps(self.json_schema, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def validate(self, value: Any) -> list[str]:
        """Errors as 'path: message' strings; empty when valid."""
        if self.model is not None:
            from pydantic import ValidationError

            try:
                self.model.model_validate(value)
                return []
            except ValidationError as exc:
                return [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()]
        import jsonschema

        validator = jsonschema.Draft202012Validator(self.json_schema, format_checker=jsonschema.FormatChecker())
        return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
                for e in sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))]


def load_schema(spec: str) -> SchemaSpec:
    """A built-in name, a 'module:Class' pydantic model, or a JSON Schema file; a ConfigError otherwise."""
    from pydantic import BaseModel

    from docpipe.schemas.extraction import BUILTIN_SCHEMAS

    if spec in BUILTIN_SCHEMAS:
        model = BUILTIN_SCHEMAS[spec]
        return SchemaSpec(spec, model.model_json_schema(), model)
    if spec.endswith(".json") or os.path.isfile(spec):
        try:
            with open(spec) as f:
                schema = json.load(f)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read JSON Schema {spec}: {describe(exc)}") from None
        import jsonschema

        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise ConfigError(f"invalid JSON Schema {spec}: {exc.message}") from None
        if schema.get("type") != "object":
            raise ConfigError(f"invalid JSON Schema {spec}: the top level must be an object schema")
        unknown = unknown_keywords(schema)
        if unknown:
            where, word, close = unknown[0]
            hint = f" (did you mean {close!r}?)" if close else ""
            more = f"; {len(unknown) - 1} more" if len(unknown) > 1 else ""
            raise ConfigError(f"invalid JSON Schema {spec}: unknown keyword {word!r} at {where}{hint}{more} (a "
                              "misspelt keyword would be ignored by validation; extensions start with 'x-')")
        return SchemaSpec(os.path.splitext(os.path.basename(spec))[0], schema)
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        _working_dir_on_path()
        try:
            model = getattr(importlib.import_module(module_name), attr)
        except Exception as exc:
            raise ConfigError(f"cannot import schema {spec}: {describe(exc)} (module:Class is imported as "
                              "`python -m` would: from the working directory, then the installed packages)") from None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise ConfigError(f"schema {spec} is not a pydantic model class")
        return SchemaSpec(attr, model.model_json_schema(), model, _from_working_dir(module_name))
    known = ", ".join(sorted(BUILTIN_SCHEMAS))
    raise ConfigError(f"unknown schema {spec!r}: use a built-in ({known}), module:Class, or a JSON Schema file")


# Keywords whose value is a schema, a list of schemas, or a map of names to schemas.
_SUBSCHEMA = {"items", "additionalItems", "additionalProperties", "contains", "propertyNames", "not", "if", "then",
              "else", "unevaluatedItems", "unevaluatedProperties", "contentSchema"}
_SUBSCHEMA_LISTS = {"allOf", "anyOf", "oneOf", "prefixItems"}
_SUBSCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
# Annotations and core keywords no validator implements (jsonschema's validators name the others).
_ANNOTATIONS = {"$schema", "$id", "$anchor", "$dynamicAnchor", "$vocabulary", "$comment", "title", "description",
                "default", "examples", "deprecated", "readOnly", "writeOnly", "contentMediaType", "contentEncoding",
                "format"}


def unknown_keywords(schema: Any) -> list[tuple[str, str, str | None]]:
    """(where, keyword, the known keyword it is closest to) for each key of a schema object that no JSON Schema
    draft knows: a misspelt `tpye` or `requird` would otherwise be ignored, and the schema would check nothing."""
    import difflib

    import jsonschema

    known = set(jsonschema.Draft202012Validator.VALIDATORS) | set(jsonschema.Draft7Validator.VALIDATORS)
    known |= _ANNOTATIONS | _SUBSCHEMA | _SUBSCHEMA_LISTS | _SUBSCHEMA_MAPS
    found = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, list):  # allOf and the like, and draft 7's tuple form of items
            for i, item in enumerate(node):
                walk(item, f"{where}[{i}]")
        if not isinstance(node, dict):  # true/false schemas
            return
        for key, value in node.items():
            path = f"{where}.{key}" if where else key
            if key not in known and not key.startswith("x-"):
                close = difflib.get_close_matches(key, sorted(known), n=1)
                found.append((where or "the top level", key, close[0] if close else None))
            elif key in _SUBSCHEMA or key in _SUBSCHEMA_LISTS:
                walk(value, path)
            elif key in _SUBSCHEMA_MAPS and isinstance(value, dict):
                for name, item in value.items():
                    walk(item, f"{path}.{name}")

    walk(schema, "")
    return found


def _working_dir_on_path() -> None:
    """Put the working directory first on sys.path, as `python -m` does (a console script gets its own bin folder
    there instead), so a user's `mymodels.py` or `schemas/` package beside them imports."""
    import sys

    cwd = os.getcwd()
    if not any(os.path.abspath(p or os.curdir) == cwd for p in sys.path):
        sys.path.insert(0, cwd)


def _from_working_dir(module_name: str) -> str | None:
    """The top-level module of ``module_name`` if it was loaded from the working directory, else None."""
    import sys

    top = sys.modules.get(module_name.split(".")[0])
    where = getattr(top, "__file__", None) or next(iter(getattr(top, "__path__", [])), None)
    if where is None:
        return None
    cwd, where = os.getcwd(), os.path.abspath(where)
    installed = {"site-packages", "dist-packages"} & set(where.split(os.sep))  # a virtualenv inside the folder
    return top.__name__ if os.path.commonpath([cwd, where]) == cwd and not installed else None


def instruction(spec: SchemaSpec, opts: ExtractOptions) -> str:
    """The extraction instruction sent after the pages' images (in runs and in fine-tuning)."""
    return opts.prompt or PROMPT_TEMPLATE.format(fields=describe_fields(spec.json_schema))


def canonical_json(value: Any, schema: dict[str, Any]) -> str:
    """``value`` written as the extraction grammar makes the model write it: compact separators, no
    whitespace, object keys in the schema's order. A fine-tuning answer in this form is one the grammar allows."""
    defs = schema.get("$defs", {})

    def order(node: Any, value: Any) -> Any:
        node = _deref(node or {}, defs)
        for option in node.get("anyOf", []):  # nullable objects and lists: the branch that fits the value
            option = _deref(option, defs)
            if isinstance(value, dict) and option.get("properties") or isinstance(value, list) and "items" in option:
                node = option
                break
        if isinstance(value, dict):
            props = node.get("properties", {})
            keys = [k for k in props if k in value] + [k for k in value if k not in props]
            return {k: order(props.get(k), value[k]) for k in keys}
        if isinstance(value, list):
            return [order(node.get("items"), v) for v in value]
        return value

    return json.dumps(order(schema, value), ensure_ascii=False, separators=(",", ":"))


def describe_fields(schema: dict[str, Any]) -> str:
    """The schema as a compact field list for the prompt: names, types and descriptions."""
    defs = schema.get("$defs", {})
    lines: list[str] = []

    def kind(node: dict[str, Any]) -> str:
        node = _deref(node, defs)
        if "anyOf" in node:
            return " or ".join(kind(n) for n in node["anyOf"])
        if node.get("type") == "array":
            return f"list of {kind(node.get('items', {}))}"
        fmt = f" ({node['format']})" if "format" in node else ""
        return f"{node.get('type', 'object')}{fmt}"

    def walk(node: dict[str, Any], prefix: str, depth: int) -> None:
        node = _deref(node, defs)
        for name, prop in node.get("properties", {}).items():
            target = _deref(prop, defs)
            desc = prop.get("description") or target.get("description") or ""
            lines.append(f"{'  ' * depth}- {prefix}{name}: {kind(prop)}{': ' + desc if desc else ''}")
            inner = next((_deref(n, defs) for n in target.get("anyOf", [target]) if _deref(n, defs).get("properties")
                          or _deref(n, defs).get("items")), None)
            if inner and inner.get("type") == "array":
                inner = _deref(inner.get("items", {}), defs)
            if inner and inner.get("properties") and depth < 3:
                walk(inner, "", depth + 1)

    walk(schema, "", 0)
    return "\n".join(lines)


def _deref(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    return defs.get(ref.rsplit("/", 1)[-1], {}) if ref else node


# Only real calendar dates, years 1800-2199 (February 29 in leap years of 1900-2099).
_YEAR = r"(1[89]|2[01])[0-9]{2}"


VALID_DATE = (
    rf"^({_YEAR}-(0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])"
    rf"|{_YEAR}-(0[469]|11)-(0[1-9]|[12][0-9]|30)"
    rf"|{_YEAR}-02-(0[1-9]|1[0-9]|2[0-8])"
    r"|(19(0[48]|[2468][048]|[13579][26])|20([02468][048]|[13579][26]))-02-29)$"
)


def generation_schema(schema: dict[str, Any], opts: ExtractOptions) -> dict[str, Any]:
    """The schema the grammar is compiled from: the user's, with caps that make every output finite.

    Strings get a length cap, numbers a range (so their digits are bounded), arrays an item cap.
    Validation still uses the user's schema; the caps only bound generation.
    """
    schema = copy.deepcopy(schema)

    def cap(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                cap(item)
            return
        if not isinstance(node, dict):
            return
        for value in node.values():
            cap(value)
        kind = node.get("type")
        # "type": ["string", "null"] is how schema files write an optional field: each type admitted gets its
        # caps (a keyword applies only to values of its own type, so they never conflict).
        kinds = set(kind) if isinstance(kind, list) else {kind}
        if "string" in kinds and node.get("format") == "date" and "pattern" not in node:
            node["pattern"] = VALID_DATE  # the format alone lets through 2026-02-30, which validation rejects
            node.pop("format")
        elif "string" in kinds and not ({"enum", "const", "format", "pattern"} & node.keys()):
            node["maxLength"] = min(node.get("maxLength", opts.max_string_chars), opts.max_string_chars)
        if kinds & {"number", "integer"}:
            node.setdefault("minimum", -opts.max_abs_number)
            node.setdefault("maximum", opts.max_abs_number)
        if "array" in kinds:
            node["maxItems"] = min(node.get("maxItems", opts.max_array_items), opts.max_array_items)

    cap(schema)
    return schema
