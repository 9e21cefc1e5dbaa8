import subprocess
import sys

import pyarrow as pa
import pytest
from pydantic import ValidationError

from docpipe.schemas import DOCUMENTS_SCHEMA, PAGES_SCHEMA, DocumentRow, PageRow

PY_TO_ARROW = {int: {pa.int32(), pa.int64()}, str: {pa.string(), pa.large_string()}}


@pytest.mark.parametrize("model,schema", [(PageRow, PAGES_SCHEMA), (DocumentRow, DOCUMENTS_SCHEMA)])
def test_pydantic_and_arrow_contracts_agree(model, schema):
    assert list(model.model_fields) == schema.names
    for name, field in model.model_fields.items():
        arrow = schema.field(name)
        takes_none = type(None) in getattr(field.annotation, "__args__", ())
        assert arrow.nullable == takes_none, f"{name}: nullable={arrow.nullable} but takes None={takes_none}"


def test_rows_reject_unknown_status_and_columns():
    ok = dict(doc_id="a" * 64, source_uri="x.pdf", page_number=1, page_count=1, status="ok", run_id="r")
    PageRow(**ok)
    with pytest.raises(ValidationError):
        PageRow(**{**ok, "status": "maybe"})
    with pytest.raises(ValidationError):
        PageRow(**{**ok, "surprise": 1})
    with pytest.raises(ValidationError):
        DocumentRow(source_uri="x", status="partial", run_id="r", error_type="not-a-type")


def test_schemas_import_without_torch_or_ray():
    code = "import sys, docpipe.schemas; bad = [m for m in ('torch', 'ray', 'transformers') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_docs_state_the_contract_version_rows_carry():
    """Every place the README and docs/ name the contract's version says the one rows are stamped with; the contract
    page names it for both tables."""
    import re
    from pathlib import Path

    from docpipe.schemas import CONTRACT_VERSION

    repo = Path(__file__).resolve().parent.parent
    version = re.compile(r"the contract's version[ ,(]+(\d+)")
    stated = {str(p.relative_to(repo)): version.findall(p.read_text())
              for p in [repo / "README.md", *sorted((repo / "docs").rglob("*.md"))]}
    everywhere = [v for found in stated.values() for v in found]
    assert len(stated["docs/contract.md"]) >= 2 and len(everywhere) >= 3, stated
    assert set(everywhere) == {str(CONTRACT_VERSION)}, stated
