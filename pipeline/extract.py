"""JSON extraction: a document's pages in, a schema-valid JSON object out.

Generation is constrained by a grammar compiled from the schema (xgrammar), so the
output always has the schema's JSON shape; pydantic (or jsonschema, for a JSON Schema
file) then validates it, custom validators included. A failed validation is data in
the row, never an exception.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import os
from dataclasses import dataclass
from typing import Any

from pipeline.config import ExtractOptions, ModelOptions
from pipeline.errors import ConfigError, describe, reraise_if_fail_fast
from pipeline.records import CHUNK

PROMPT_TEMPLATE = (
    "Extract the information from this document as JSON matching the schema below. "
    "Use null for anything the document does not show; do not invent values.\n{fields}"
)


@dataclass(frozen=True)
class SchemaSpec:
    name: str
    json_schema: dict[str, Any]
    model: Any = None  # a pydantic model class, or None for a JSON Schema file

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

    from schemas.extraction import BUILTIN_SCHEMAS

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
        return SchemaSpec(os.path.splitext(os.path.basename(spec))[0], schema)
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            model = getattr(importlib.import_module(module_name), attr)
        except Exception as exc:
            raise ConfigError(f"cannot import schema {spec}: {describe(exc)}") from None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise ConfigError(f"schema {spec} is not a pydantic model class")
        return SchemaSpec(attr, model.model_json_schema(), model)
    known = ", ".join(sorted(BUILTIN_SCHEMAS))
    raise ConfigError(f"unknown schema {spec!r}: use a built-in ({known}), module:Class, or a JSON Schema file")


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


# xgrammar writes a length-capped string's characters as [^"\\\r\n], which admits raw control characters
# that JSON forbids (its unbounded strings exclude them). Patched in the grammar text.
_CAPPED_CHARS = '[^\\"\\\\\\r\\n]'
_JSON_CHARS = '[^\\0-\\x1f\\"\\\\\\r\\n]'


def build_grammar(schema: dict[str, Any], opts: ExtractOptions):
    """The grammar for a schema: capped (generation_schema), compact separators, no free whitespace, so not
    one token is spent on formatting. Needs no tokenizer, so the driver can check a schema up front."""
    import xgrammar as xgr

    try:
        grammar = xgr.Grammar.from_json_schema(
            json.dumps(generation_schema(schema, opts)), any_whitespace=False, separators=(",", ":")
        )
        return xgr.Grammar.from_ebnf(str(grammar).replace(_CAPPED_CHARS, _JSON_CHARS))
    except Exception as exc:
        raise ConfigError(f"cannot build a grammar for the schema: {describe(exc)}") from None


def merge_chunks(parts: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Merge per-chunk extractions of one document, in page order.

    The rule: for each field the first chunk with a non-null value wins; lists are
    concatenated across chunks; objects are merged field by field with the same rule.
    """
    merged: dict[str, Any] = {}
    for part in parts:
        if isinstance(part, dict):
            merged = _merge(merged, part)
    return merged


def _merge(a: Any, b: Any) -> Any:
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _merge(a.get(k), b.get(k)) if k in a else b[k] for k in {**a, **b}}
    if isinstance(a, list) and isinstance(b, list):
        return a + b
    return b if a is None or a == [] or a == {} else a


class ExtractStage:
    """Chunk records (a document's pages, up to the page cap) in, extraction results out."""

    def __init__(self, opts: ModelOptions, extract: ExtractOptions, loaded):
        import xgrammar as xgr

        self.opts, self.extract, self.m = opts, extract, loaded
        self.spec = load_schema(extract.schema_spec)
        from pipeline.model import stop_and_pad_ids

        tokenizer = loaded.processor.tokenizer
        self.stop_ids, self.pad_id = stop_and_pad_ids(loaded)
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=loaded.model.get_output_embeddings().weight.shape[0], stop_token_ids=self.stop_ids
        )
        self.grammar = xgr.GrammarCompiler(info).compile_grammar(build_grammar(self.spec.json_schema, extract))
        self.text = instruction(self.spec, extract)

    def prompt(self, pages: int) -> str:
        from pipeline.model import chat_prompt

        return chat_prompt(self.m.processor, pages, self.text)

    def __call__(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Chunks are extracted batch_size to a generate() call (one grammar matcher per row), sorted by page
        count so a batch's prompts are of similar length. A batch that fails is retried chunk by chunk, so
        one document's failure stays in its own row."""
        from pipeline.ocr import decode_page

        todo = []
        for rec in records:
            if rec["kind"] != CHUNK or rec["status"] != "ok":
                continue
            try:
                pixels = [decode_page(img, codec, w, h) for img, codec, w, h in
                          zip(rec["images"], rec["image_codecs"], rec["widths"], rec["heights"])]
                todo.append((rec, pixels, int(rec["doc_id"][:8], 16) + rec["chunk_index"]))
            except Exception as exc:
                reraise_if_fail_fast()
                rec.update(status="error", error_type="model_error", error_message=describe(exc))
        todo.sort(key=lambda item: len(item[1]))
        size = self.opts.batch_size
        for start in range(0, len(todo), size):
            self._extract_batch(todo[start : start + size])
        return records

    def _extract_batch(self, batch: list[tuple[dict[str, Any], list, int]]) -> None:
        try:
            firsts = self._attempts([pixels for _, pixels, _ in batch], temperature=None, seed=0)
        except Exception as exc:
            reraise_if_fail_fast()
            if len(batch) == 1:
                batch[0][0].update(status="error", error_type="model_error", error_message=describe(exc))
                return
            for item in batch:
                self._extract_batch([item])
            return
        for (rec, pixels, seed), first in zip(batch, firsts):
            try:
                rec.update(self._with_retry(first, pixels, seed))
            except Exception as exc:  # the retry failed: this document's row only
                reraise_if_fail_fast()
                rec.update(status="error", error_type="model_error", error_message=describe(exc))

    def extract_one(self, pixels: list, seed: int) -> dict[str, Any]:
        """One chunk on its own: greedy first, then the retry if its output fails validation."""
        return self._with_retry(self._attempts([pixels], temperature=None, seed=seed)[0], pixels, seed)

    def _with_retry(self, result: dict[str, Any], pixels: list, seed: int) -> dict[str, Any]:
        """Output that fails validation gets one retry at a higher temperature."""
        attempts = 1
        if not result["valid"] and self.extract.retry_temperature > 0:
            [retry] = self._attempts([pixels], temperature=self.extract.retry_temperature, seed=seed)
            attempts = 2
            if retry["valid"] or not result["parsed"]:
                result = retry
        result["extraction_attempts"] = attempts
        return result

    def _attempts(self, pixels: list[list], temperature: float | None, seed: int) -> list[dict[str, Any]]:
        """One generate() call for several chunks (each its own page images), one grammar matcher per row."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        from pipeline.ocr import model_inputs

        m = self.m
        device = m.device if self.opts.processor_device == "model" else "cpu"
        inputs = model_inputs(m, [self.prompt(len(p)) for p in pixels], pixels, device)
        sampling = {"do_sample": True, "temperature": temperature} if temperature else {"do_sample": False}
        if temperature:
            torch.manual_seed(seed)  # reproducible retries
        guard = RepetitionGuard(self.extract.max_repeat)
        grammar = GrammarProcessor(self.grammar, len(pixels), guard)
        with torch.inference_mode():
            out = m.model.generate(
                **inputs,
                max_new_tokens=self.extract.max_new_tokens,
                logits_processor=LogitsProcessorList([grammar]),
                stopping_criteria=StoppingCriteriaList([guard]),
                eos_token_id=self.stop_ids,
                pad_token_id=self.pad_id,
                **sampling,
            )
        return [self._result(tokens, row in guard.rows)
                for row, tokens in enumerate(out[:, inputs["input_ids"].shape[1] :].tolist())]

    def _result(self, tokens: list[int], repeated: bool) -> dict[str, Any]:
        m = self.m
        if repeated:  # what follows the guard's stop in a batch is padding
            tokens = tokens[: _repetition_end(tokens, self.extract.max_repeat)]
        end = next((i for i, t in enumerate(tokens) if t in self.stop_ids), None)
        text = m.processor.tokenizer.decode(tokens if end is None else tokens[:end], skip_special_tokens=True)
        finish = "stop" if end is not None else "repetition" if repeated else "length"
        parsed, errors = None, []
        try:
            parsed = json.loads(text)
        except ValueError as exc:
            errors = [f"<output>: not complete JSON ({finish}): {exc}"]
        if parsed is not None:
            errors = self.spec.validate(parsed)
        return {
            "raw_output": text,
            "extraction": json.dumps(parsed, ensure_ascii=False, separators=(",", ":")) if parsed is not None else None,
            "parsed": parsed,
            "valid": parsed is not None and not errors,
            "validation_errors": errors,
            "extraction_finish_reason": finish,
            "output_tokens": len(tokens) if end is None else end + 1,
            "model": m.name,
        }


def _repetition_end(tokens: list[int], limit: int) -> int:
    """Length of ``tokens`` up to the first run of ``limit`` equal tokens (where the guard stopped the row)."""
    run = 1
    for i in range(1, len(tokens)):
        run = run + 1 if tokens[i] == tokens[i - 1] else 1
        if run >= limit:
            return i + 1
    return len(tokens)


class GrammarProcessor:
    """xgrammar's token masks for a batch of rows, one matcher each. Unlike xgrammar's own HF processor it
    leaves alone rows that generate() has finished by a stopping criterion (the repetition guard), which
    then receive padding the grammar would refuse."""

    def __init__(self, grammar, rows: int, guard: "RepetitionGuard"):
        import xgrammar as xgr

        self.matchers = [xgr.GrammarMatcher(grammar) for _ in range(rows)]
        self.bitmask = xgr.allocate_token_bitmask(rows, grammar.tokenizer_info.vocab_size)
        self.guard, self.started = guard, False

    def __call__(self, input_ids, scores):
        import xgrammar as xgr

        # Every row's last token in one copy: one GPU sync a step, not one a row.
        last = input_ids[:, -1].tolist() if self.started else []
        for i, matcher in enumerate(self.matchers):
            if self.started and i not in self.guard.rows and not matcher.is_terminated():
                if not matcher.accept_token(last[i]):
                    raise RuntimeError(f"row {i}: the grammar refused a token it had allowed")
            if not matcher.is_terminated():
                matcher.fill_next_token_bitmask(self.bitmask, i)
        self.started = True
        device = scores.device
        scores = scores if device.type in ("cuda", "cpu") else scores.to("cpu")
        xgr.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device))
        return scores.to(device)


class RepetitionGuard:
    """Stops generation when one token repeats ``limit`` times in a row: a run-away loop, not content."""

    def __init__(self, limit: int):
        self.limit, self.tripped, self.rows = limit, False, set()

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if input_ids.shape[1] >= self.limit:
            tail = input_ids[:, -self.limit :]
            done = (tail == tail[:, :1]).all(dim=1)
            if done.any():
                self.tripped = True
                self.rows.update(i for i in done.nonzero().flatten().tolist())
        return done
