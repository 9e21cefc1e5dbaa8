"""JSON extraction: schema loading, grammar caps, merging, and runs through the CLI with the tiny model."""

import json

import pyarrow.parquet as pq
import pytest

from docpipe.config import ExtractOptions
from docpipe.errors import ConfigError
from docpipe.extract.schema import VALID_DATE, describe_fields, generation_schema, load_schema
from docpipe.extract.grammar import RepetitionGuard, build_grammar
from docpipe.extract.merge import merge_chunks
from docpipe.schemas.extraction import Invoice, Receipt
from tests.conftest import run_cli

PO_SCHEMA = {
    "type": "object",
    "properties": {
        "reference": {"type": "string", "description": "Document reference."},
        "lines": {"type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string"},
                                                                             "qty": {"type": "integer"}},
                                             "required": ["sku", "qty"]}},
        "approved": {"type": "boolean"},
    },
    "required": ["reference", "lines"],
}


def test_schema_specs_load_or_fail_fast(tmp_path):
    assert load_schema("invoice").model is Invoice and load_schema("receipt").model is Receipt
    assert load_schema("tests.extraction_models:PurchaseOrder").name == "PurchaseOrder"
    path = tmp_path / "po.json"
    path.write_text(json.dumps(PO_SCHEMA))
    spec = load_schema(str(path))
    assert spec.model is None and spec.name == "po" and len(spec.hash) == 16
    assert spec.validate({"reference": "A1", "lines": [{"sku": "x", "qty": 2}]}) == []
    assert spec.validate({"reference": "A1", "lines": [{"sku": "x", "qty": "two"}]}) == ["lines.0.qty: 'two' is not of type 'integer'"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "object", "properties": {"x": {"type": "nonsense"}}}))
    # misspelt keywords: JSON Schema ignores unknown ones, so the schema would check nothing there
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"type": "object", "requird": ["a"], "properties": {"a": {"tpye": "string"}}}))
    for arg, message in [
        ("nope", "unknown schema 'nope'"),
        ("no_such_module:Thing", "cannot import schema no_such_module:Thing"),
        ("tests.extraction_models:NOT_A_MODEL", "is not a pydantic model class"),
        (str(bad), "invalid JSON Schema"),
        (str(typo), r"unknown keyword 'requird' at the top level \(did you mean 'required'\?\); 1 more"),
        (str(tmp_path / "missing.json"), "cannot read JSON Schema"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_schema(arg)


def test_misspelt_keywords_are_found_where_they_are_and_extensions_pass():
    from docpipe.extract.schema import unknown_keywords

    schema = {"type": "object", "x-ui": {"order": 1}, "properties": {"type": {"tpye": "string"}, "n": {
        "anyOf": [{"type": "integer", "minimun": 0}, {"type": "null"}]}}, "$defs": {"L": {"items": {"enmu": [1]}}}}
    assert unknown_keywords(schema) == [("properties.type", "tpye", "type"),
                                        ("properties.n.anyOf[0]", "minimun", "minimum"),
                                        ("$defs.L.items", "enmu", "enum")]
    assert unknown_keywords(PO_SCHEMA) == [] and unknown_keywords(Invoice.model_json_schema()) == []


USER_MODELS = """
from pydantic import BaseModel, field_validator


class PO(BaseModel):
    number: str

    @field_validator("number")
    @classmethod
    def upper(cls, value):
        if not value.isupper():
            raise ValueError("must be upper case")
        return value
"""


def _forget(modules) -> None:
    """The user's modules out of this process again, and out of cloudpickle's by-value registry."""
    import sys

    import ray.cloudpickle

    for name in modules:
        module = sys.modules.pop(name, None)
        if name in ray.cloudpickle.list_registry_pickle_by_value():
            ray.cloudpickle.unregister_pickle_by_value(module)


def test_a_schema_in_the_working_directory_imports_as_python_m_would_and_travels_by_value(tmp_path, monkeypatch,
                                                                                         request):
    """A user's own `schemas` (or `pipeline`) package and a module beside them, named as --schema module:Class from
    that folder: docpipe finds them without PYTHONPATH, its own packages stay its own, and the class reaches Ray
    workers by value (inside the pickled model actor), where the folder may not exist."""
    import os
    import subprocess
    import sys

    from docpipe.config import ModelOptions
    from docpipe.execute import stages
    from docpipe.execute.plan import ship_schema

    for package in ("schemas", "pipeline"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
        (tmp_path / package / "models.py").write_text(USER_MODELS)
    (tmp_path / "mymodels.py").write_text(USER_MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    users = ("schemas", "schemas.models", "pipeline", "pipeline.models", "mymodels")
    assert not set(users) & set(sys.modules)
    request.addfinalizer(lambda: _forget(users))
    for spec, top in (("schemas.models:PO", "schemas"), ("pipeline.models:PO", "pipeline"), ("mymodels:PO", "mymodels")):
        schema = load_schema(spec)
        assert (schema.name, schema.local_module) == ("PO", top)
        assert schema.validate({"number": "AB1"}) == [] and schema.validate({"number": "ab1"}) == [
            "number: Value error, must be upper case"]
    from docpipe.schemas import DOCUMENTS_SCHEMA  # ours, beside the user's `schemas`

    assert "extraction" in DOCUMENTS_SCHEMA.names and sys.modules["schemas"].__file__.startswith(str(tmp_path))
    assert load_schema("invoice").local_module is None  # installed: imported by name, as ever

    import ray.cloudpickle

    schema = load_schema("schemas.models:PO")
    ship_schema(schema)
    actor = stages.model_actor(ModelOptions(name="tiny-random"), ExtractOptions(schema="schemas.models:PO"), "extract",
                               schema=schema)
    pickled = tmp_path / "actor.pkl"
    pickled.write_bytes(ray.cloudpickle.dumps(actor))
    # elsewhere: another folder, without the user's package on any path
    check = ("import pickle, sys; actor = pickle.load(open(sys.argv[1], 'rb')); "
             "print(actor.extraction_schema.validate({'number': 'ab1'}), 'schemas' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", check, str(pickled)], cwd="/", capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"]})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["['number:", "Value", "error,", "must", "be", "upper", "case']", "False"]


def test_prompt_describes_the_fields():
    text = describe_fields(Invoice.model_json_schema())
    for expected in ("- invoice_number: string or null: The invoice's number", "- line_items: list of object",
                     "  - description: string: What was sold.", "issue_date: string (date) or null"):
        assert expected in text


def test_generation_schema_bounds_every_output():
    gen = generation_schema(Invoice.model_json_schema(), ExtractOptions(max_string_chars=20, max_array_items=3))
    item = gen["$defs"]["LineItem"]["properties"]
    assert item["description"]["maxLength"] == 20
    assert gen["properties"]["line_items"]["maxItems"] == 3
    assert item["quantity"]["anyOf"][0]["minimum"] == 0 and item["quantity"]["anyOf"][0]["maximum"] == 1e12
    assert gen["properties"]["currency"]["anyOf"][0]["pattern"] == "^[A-Z]{3}$"  # the user's pattern is kept


def test_grammar_rejects_raw_control_characters_in_capped_strings():
    import xgrammar as xgr

    from docpipe.model.tiny import build_tokenizer

    tok = build_tokenizer()
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, stop_token_ids=[tok.eos_token_id]))
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    matcher = xgr.GrammarMatcher(compiler.compile_grammar(build_grammar(schema, ExtractOptions(max_string_chars=512))))
    assert matcher.accept_string('{"a":"fine text"}')
    matcher.reset()
    assert not matcher.accept_string('{"a":"tab\there"}')
    matcher.reset()
    assert not matcher.accept_string('{"a": "spaced"}')  # compact: no whitespace between tokens


def test_generated_dates_are_real_calendar_dates():
    import xgrammar as xgr

    from docpipe.model.tiny import build_tokenizer

    tok = build_tokenizer()
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, stop_token_ids=[tok.eos_token_id]))
    schema = {"type": "object", "properties": {"d": {"type": "string", "format": "date"}}, "required": ["d"]}
    grammar = compiler.compile_grammar(build_grammar(schema, ExtractOptions()))
    for date, ok in [("2026-01-31", True), ("2024-02-29", True), ("2026-02-29", False), ("2026-02-30", False),
                     ("2026-04-31", False), ("0000-01-01", False), ("2026-13-01", False), ("1999-12-31", True)]:
        matcher = xgr.GrammarMatcher(grammar)
        assert matcher.accept_string(f'{{"d":"{date}"}}') is ok, date


def test_chunks_merge_first_value_wins_and_lists_concatenate():
    merged = merge_chunks([
        {"invoice_number": "A-1", "total": None, "line_items": [{"description": "x"}], "vendor": {"name": "V"}},
        None,
        {"invoice_number": "B-2", "total": 9.5, "line_items": [{"description": "y"}], "vendor": {"address": "Rd"}},
    ])
    assert merged == {"invoice_number": "A-1", "total": 9.5, "line_items": [{"description": "x"}, {"description": "y"}],
                      "vendor": {"name": "V", "address": "Rd"}}


def test_a_runaway_loop_ends_as_finish_reason_repetition(tiny_model, sample_docs, tmp_path):
    """The guard inside real generation: a schema whose only valid string is one character repeated (a
    single-token character in the tiny vocabulary) makes the model loop, and the guard ends it."""
    from docpipe.config import ModelOptions, RenderOptions
    from docpipe.render.document import expand_document
    from docpipe.extract.stage import ExtractStage

    schema = tmp_path / "loop.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"note": {"type": "string", "const": "~" * 40}},
                                  "required": ["note"]}))
    assert tiny_model.processor.tokenizer.tokenize("~~~") == ["~", "~", "~"]
    [chunk] = [r for r in expand_document(str(sample_docs / "receipt.png"), RenderOptions(), 1960, chunk_pages=8)
               if r["kind"] == "chunk"]
    stage = ExtractStage(ModelOptions(name="tiny-random"),
                         ExtractOptions(schema=str(schema), max_repeat=8, max_new_tokens=100), tiny_model)
    [out] = stage([chunk])
    assert out["status"] == "ok" and out["extraction_finish_reason"] == "repetition"
    assert out["raw_output"] == '{"note":"' + "~" * 8 and out["valid"] is False  # stopped at 8, far before 100


def test_a_chunk_whose_extraction_raises_makes_the_document_partial(tiny_model, sample_docs):
    """extraction_failed: one chunk's extraction raised; the others' results are kept, the document is partial."""
    from docpipe.config import ModelOptions, RenderOptions
    from docpipe.render.document import expand_document
    from docpipe.extract.stage import ExtractStage
    from docpipe.output.ledger import DocumentLedger
    from docpipe.sources import DocumentRef

    class FailsOnSecondChunk(ExtractStage):
        """Any generate() call holding the 1-page chunk fails: first the batch of both chunks, then that chunk
        on its own, while the 2-page chunk, retried on its own, succeeds."""

        def _attempts(self, pixels, temperature, seed):
            if any(len(p) == 1 for p in pixels):  # report.pdf at --page-cap 2: chunks of 2 pages and 1 page
                raise RuntimeError("CUDA out of memory (simulated)")
            return super()._attempts(pixels, temperature, seed)

    uri = str(sample_docs / "report.pdf")
    records = list(expand_document(uri, RenderOptions(), 1960, ocr=False, chunk_pages=2))
    stage = FailsOnSecondChunk(ModelOptions(name="tiny-random"),
                               ExtractOptions(schema="invoice", max_new_tokens=64), tiny_model)
    ledger = DocumentLedger([DocumentRef(uri)], "run", load_schema("invoice"))
    done = [ledger.add(r) for r in stage(records)]
    [(row, pages)] = [d for d in done if d]
    assert (row["status"], row["error_type"]) == ("partial", "extraction_failed")
    assert row["error_message"] == "extraction failed on 1 of 2 chunks" and row["valid"] is False
    assert row["validation_errors"] == ["chunk 2: model_error: RuntimeError: CUDA out of memory (simulated)"]
    assert row["extraction"] is not None and len(pages) == 3  # the first chunk's result and every page kept


def test_repetition_guard_stops_a_loop():
    import torch

    guard = RepetitionGuard(4)
    ids = torch.tensor([[1, 2, 7, 7, 7, 7], [1, 7, 2, 7, 7, 7]])
    assert guard(ids, None).tolist() == [True, False] and guard.tripped


def read_docs(out):
    return {r["source_uri"].rsplit("/", 1)[-1]: r for r in pq.read_table(out / "documents").to_pylist()}


@pytest.mark.ray
def test_ocr_and_invoice_extraction_in_one_pass(sample_docs, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("run", sample_docs, "--output", out, "--task", "ocr+extract", "--schema", "invoice",
                   "--model", "tiny-random", "--max-new-tokens", "2", "--page-cap", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    docs = read_docs(out)
    assert docs["corrupt.pdf"]["status"] == "error" and docs["corrupt.pdf"]["extraction"] is None
    ok = [d for d in docs.values() if d["status"] == "ok"]
    assert len(ok) == 5
    for d in ok:
        assert d["valid"] is True, d["validation_errors"]
        assert d["schema_name"] == "invoice" and d["schema_hash"] == load_schema("invoice").hash
        Invoice.model_validate_json(d["extraction"])
        assert d["raw_output"] and d["extraction_finish_reason"] == "stop"
    # report.pdf has 3 pages: two chunks at --page-cap 2, merged into one object
    assert len(json.loads(docs["report.pdf"]["raw_output"])) == 2
    assert docs["receipt.png"]["extraction_attempts"] == 1
    pages = pq.read_table(out / "pages").to_pylist()
    assert len(pages) == 9 and all(p["text"] is not None for p in pages)


def test_receipt_extraction_with_a_lora_adapter(sample_docs, tmp_path, tiny_checkpoint, tiny_model):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from docpipe.config import ModelOptions, RenderOptions
    from docpipe.render.document import expand_document
    from docpipe.extract.stage import ExtractStage

    torch.manual_seed(0)  # a fixed random adapter, strong enough (alpha 16) to change what the tiny model writes
    base = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out"
    local = tmp_path / "local.yaml"  # the model stages in the CLI's own process, loading the adapter as actors do
    local.write_text("executor: local\n")
    proc = run_cli("run", sample_docs / "receipt.png", sample_docs / "scan.jpg", "--output", out, "--task", "extract",
                   "--schema", "receipt", "--model", "tiny-random", "--adapter", tmp_path / "adapter", "--no-progress",
                   "--config", local)
    assert proc.returncode == 0, proc.stderr[-3000:]
    docs = read_docs(out)
    assert sorted(docs) == ["receipt.png", "scan.jpg"] and {d["status"] for d in docs.values()} == {"ok"}
    for d in docs.values():
        assert d["valid"] is True, d["validation_errors"]
        Receipt.model_validate_json(d["extraction"])
    pages = pq.read_table(out / "pages").to_pylist()
    assert len(pages) == 2 and all(p["text"] is None for p in pages)  # extract only: no OCR text
    # the adapter changed what the run produced: the base model, given the same pages, writes something else
    base = ExtractStage(ModelOptions(name="tiny-random"), ExtractOptions(schema="receipt"), tiny_model)
    same = []
    for name in ("receipt.png", "scan.jpg"):
        [chunk] = [r for r in expand_document(str(sample_docs / name), RenderOptions(), 1960, chunk_pages=8)
                   if r["kind"] == "chunk"]
        [plain] = base([chunk])
        assert plain["status"] == "ok"
        same.append(plain["raw_output"] == docs[name]["raw_output"])
        if not same[-1]:
            break
    assert not all(same), "the adapter changed no output"


def test_adapter_changes_the_model(tiny_checkpoint, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from docpipe.config import ModelOptions
    from docpipe.model.load import load_model

    base = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(
        tmp_path / "a")
    plain = load_model(ModelOptions(name="tiny-random"), str(tiny_checkpoint)).model
    tuned = load_model(ModelOptions(name="tiny-random", adapter=str(tmp_path / "a")), str(tiny_checkpoint)).model
    ids = torch.tensor([[1, 5, 9, 12]])
    assert not torch.allclose(plain(input_ids=ids).logits, tuned(input_ids=ids).logits)
    assert not any("lora" in n for n, _ in tuned.named_parameters())  # merged into the base weights


def test_user_model_json_schema_file_and_failing_validator(sample_docs, tmp_path):
    schema_file = tmp_path / "po.json"
    schema_file.write_text(json.dumps(PO_SCHEMA))
    local = tmp_path / "local.yaml"  # the stages in the CLI's own process: schemas are this test's subject, not Ray
    local.write_text("executor: local\n")
    for spec, expect_valid in [("tests.extraction_models:PurchaseOrder", True), (str(schema_file), True),
                               ("tests.extraction_models:AuditedTotal", False)]:
        out = tmp_path / spec.rsplit(":", 1)[-1].replace("/", "_")
        argv = ["run", str(sample_docs / "receipt.png"), str(sample_docs / "minutes.pdf"), "--output", str(out),
                "--task", "extract", "--schema", spec, "--model", "tiny-random", "--no-progress", "--config",
                str(local)]
        proc = run_cli(*argv, "--fail-on-invalid")
        # the summary says how many extractions validated; --fail-on-invalid turns "not valid" into exit 3
        assert proc.returncode == (0 if expect_valid else 3), proc.stderr[-3000:]
        assert f"extraction valid {2 if expect_valid else 0}, not valid {0 if expect_valid else 2}" in proc.stdout
        if not expect_valid:
            assert proc.stderr.strip().splitlines()[-1] == (
                "docpipe: 2 extractions not valid against the schema (--fail-on-invalid)")
            _judged_without_the_flag(argv, out)
        for d in read_docs(out).values():
            assert d["status"] == "ok" and d["valid"] is expect_valid, (spec, d["validation_errors"])
            if expect_valid:
                assert load_schema(spec).validate(json.loads(d["extraction"])) == []
            else:
                assert any("confirmed by a second source" in e for e in d["validation_errors"])
                assert d["extraction_attempts"] == 2  # one retry at a higher temperature, recorded


def _judged_without_the_flag(argv: list[str], out) -> None:
    """The run just made, as the same command line without --fail-on-invalid (the default) would end it: exit 0,
    its summary still saying how many extractions are not valid (a second run would cost a model load)."""
    import io

    from docpipe.cli import build_parser, config_from_args, exit_status, print_summary
    from docpipe.execute.run import RunResult
    from docpipe.schemas import RunManifest

    args = build_parser().parse_args(argv)
    config = config_from_args(args, args.inputs, args.output).model_dump(mode="json")
    [record] = (out / "_runs").glob("*.json")
    manifest = RunManifest.model_validate_json(record.read_text())
    result = RunResult(manifest.model_copy(update={"config": config}), str(out))
    summary = io.StringIO()
    print_summary(result, summary)
    assert exit_status(result) == 0 and "extraction valid 0, not valid 2\n" in summary.getvalue()
    assert exit_status(RunResult(manifest, str(out))) == 3  # the record as run: with the flag


def test_a_bad_schema_fails_before_reading(sample_docs, tmp_path):
    proc = run_cli("run", sample_docs, "--output", tmp_path / "out", "--task", "extract", "--schema", "nope",
                   "--model", "tiny-random")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "docpipe: error: unknown schema 'nope': use a built-in (invoice, key_values, receipt), module:Class, "
        "or a JSON Schema file"]
    assert not (tmp_path / "out").exists()  # failed before the output was even prepared


def test_fields_typed_as_a_list_get_the_caps_of_every_type_they_admit():
    """'"type": ["string", "null"]', the usual optional field of a schema file: capped like "string" (a date
    field had no calendar pattern and was generated as "7858-11-16"), and null still allowed."""
    import xgrammar as xgr

    from docpipe.model.tiny import build_tokenizer

    schema = {"type": "object", "required": ["d", "s", "n", "a"], "properties": {
        "d": {"type": ["string", "null"], "format": "date"},
        "s": {"type": ["string", "null"]},
        "n": {"type": ["number", "null"]},
        "a": {"type": ["array", "null"], "items": {"type": ["integer", "string"]}}}}
    opts = ExtractOptions(max_string_chars=5, max_array_items=2, max_abs_number=100)
    props = generation_schema(schema, opts)["properties"]
    assert props["d"]["pattern"] == VALID_DATE and "format" not in props["d"]
    assert props["s"]["maxLength"] == 5
    assert (props["n"]["minimum"], props["n"]["maximum"]) == (-100, 100)
    assert props["a"]["maxItems"] == 2
    assert props["a"]["items"] == {"type": ["integer", "string"], "maxLength": 5, "minimum": -100, "maximum": 100}

    tok = build_tokenizer()
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, stop_token_ids=[tok.eos_token_id]))
    grammar = compiler.compile_grammar(build_grammar(schema, opts))
    for text, ok in [('{"d":null,"s":null,"n":null,"a":null}', True),
                     ('{"d":"2026-01-31","s":"abcde","n":-99.5,"a":[1,"x"]}', True),
                     ('{"d":"7858-11-16","s":null,"n":null,"a":null}', False),
                     ('{"d":null,"s":"abcdef","n":null,"a":null}', False),
                     ('{"d":null,"s":null,"n":1000,"a":null}', False),
                     ('{"d":null,"s":null,"n":null,"a":[1,2,3]}', False)]:
        assert xgr.GrammarMatcher(grammar).accept_string(text) is ok, text
