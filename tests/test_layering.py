"""The house's layout, checked: who may import whom, and which commands stay light.

Fast and Ray-free: the import graph is read with ``ast`` from every .py under pipeline/, schemas/ and jobs/,
module-level and function-level imports alike (a lazy import still ties two modules together).

The rules are one table, RULES: (the rule, whose imports it checks, what they must not import, what it lets
through). A module matches a pattern when it is the pattern or lies under it (``docpipe.execute`` matches
pipeline/execute/*); "A -> B" lets one module import one other. A failure names the importer, its line, the
module it imports and the rule. Light commands: ``docpipe config schema`` and ``docpipe eval`` run in a fresh
interpreter and must not load HEAVY.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
# Each folder and the import name it is installed under (pyproject.toml's package-dir).
OURS = {"pipeline": "docpipe", "schemas": "docpipe.schemas", "jobs": "docpipe.jobs"}
# Everything installed from pipeline/: docpipe and its modules, not docpipe.schemas or docpipe.jobs.
PIPELINE = sorted({"docpipe." + p.stem for p in (ROOT / "pipeline").iterdir()
                   if p.suffix == ".py" and p.stem != "__init__" or (p / "__init__.py").exists()})

FOUNDATIONS = ["docpipe.config", "docpipe.errors", "docpipe.records", "docpipe.storage", "docpipe.sources"]
PACKAGES = ["docpipe.render", "docpipe.model", "docpipe.extract", "docpipe.output", "docpipe.execute",
            "docpipe.tools"]
STAGES = ["docpipe.render", "docpipe.model", "docpipe.extract", "docpipe.output", "docpipe.ocr"]

# (rule, importers, forbidden imports, let through: importers, or "importer -> imported" pairs)
RULES: list[tuple[str, list[str], list[str], list[str]]] = [
    ("Ray is imported only by the executor (pipeline/execute/): the one door to Ray",
     ["docpipe"], ["ray"], ["docpipe.execute"]),
    ("schemas (the output contract) imports nothing from pipeline: it is importable without torch or Ray",
     ["docpipe.schemas"], PIPELINE, []),
    ("the foundations (config, errors, records, storage, sources) import no pipeline package, nor ocr or cli",
     FOUNDATIONS, PACKAGES + ["docpipe.ocr", "docpipe.cli"], []),
    ("the stages (render, model, extract, output, ocr) never import the executor, the tools or the CLI",
     STAGES, ["docpipe.execute", "docpipe.tools", "docpipe.cli"], []),
    ("tools are imported by cli.py and by tools; the executor imports tools/finetune.py alone: execute/train.py "
     "runs its training loop, execute/run.py checks an adapter against its training record",
     ["docpipe"], ["docpipe.tools"],
     ["docpipe.cli", "docpipe.tools", "docpipe.execute.train -> docpipe.tools.finetune",
      "docpipe.execute.run -> docpipe.tools.finetune"]),
    ("nothing under pipeline/ or schemas/ imports jobs/ (job configs and scripts sit on top)",
     PIPELINE + ["docpipe.schemas"], ["docpipe.jobs"], []),
    ("nothing imports the CLI: it is the top (but the reference generator, tools/reference.py, reads its parser)",
     ["docpipe"], ["docpipe.cli"], ["docpipe.cli", "docpipe.tools.reference -> docpipe.cli"]),
]

# Modules a light command must not load: each costs seconds, or needs a GPU stack.
HEAVY = ["torch", "transformers", "fitz", "pymupdf", "pypdfium2", "ray"]


def under(name: str, patterns: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in patterns)


def let_through(importer: str, target: str, allowed: list[str]) -> bool:
    pairs = [a.split(" -> ") for a in allowed if " -> " in a]
    return under(importer, [a for a in allowed if " -> " not in a]) \
        or any(importer == a and under(target, [b]) for a, b in pairs)


def module_name(path: Path) -> str:
    folder, *parts = path.relative_to(ROOT).with_suffix("").parts
    parts = [OURS[folder], *parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    found = {}
    for top in OURS:
        for path in sorted((ROOT / top).rglob("*.py")):
            found[module_name(path)] = path
    return found


def imports(path: Path, name: str, known: dict[str, Path]) -> list[tuple[str, int]]:
    """Every module this file imports (ours resolved to the module, others by their full dotted name), with
    its line: module level and inside functions alike."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from docpipe.execute import stages` imports the module docpipe.execute.stages
            subs = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known]
            found += [(sub, node.lineno) for sub in subs] or [(target, node.lineno)]
    return found


def graph() -> dict[str, list[tuple[str, int]]]:
    known = modules()
    return {name: imports(path, name, known) for name, path in known.items()}


def ours(target: str, known) -> str | None:
    """The module of ours an import names (the longest known prefix), or None for a third-party import."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in known:
            return ".".join(parts[:i])
    return None


def test_the_rules_table_names_modules_that_exist():
    """A rule about a module renamed away would check nothing: every pattern names one of ours (or ray)."""
    known = list(modules())
    for rule, importers, forbidden, allowed in RULES:
        for entry in importers + forbidden + allowed:
            for pattern in entry.split(" -> "):
                assert pattern == "ray" or any(under(k, [pattern]) for k in known), \
                    f"rule {rule!r} names {pattern}, which is no module of ours"


def test_layers_point_one_way():
    broken = []
    for importer, targets in sorted(graph().items()):
        for target, line in targets:
            for rule, importers, forbidden, allowed in RULES:
                if under(importer, importers) and under(target, forbidden) \
                        and not let_through(importer, target, allowed):
                    broken.append(f"{importer} (line {line}) imports {target}: breaks '{rule}'")
    assert not broken, "\n".join(broken)


def test_no_import_cycles():
    g = graph()
    known = set(g)
    edges = {m: sorted({t for t in (ours(target, known) for target, _ in targets) if t and t != m})
             for m, targets in g.items()}
    # A package's __init__ runs before its modules; ours hold no imports of their own modules, so an edge to a
    # package is an edge to its __init__ alone.
    cycles, state, stack = [], {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in edges[m]:
            if state.get(n) == "open":
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)
    lines = {(m, t): line for m, targets in g.items() for target, line in targets if (t := ours(target, known))}
    detail = [c + "  (" + ", ".join(f"{a}:{lines[a, b]}" for a, b in zip(c.split(" -> "), c.split(" -> ")[1:]))
              + ")" for c in cycles]
    assert not cycles, "import cycles (module:line of each import):\n" + "\n".join(detail)


def test_the_graph_sees_lazy_imports_and_submodules():
    """The checks above can fail: a function-level import is in the graph, and `from docpipe.execute import
    stages` is an import of the module docpipe.execute.stages."""
    g = graph()
    assert ("docpipe.tools.finetune" in {t for t, _ in g["docpipe.execute.train"]})  # inside finetune()
    assert "ray" in {t for t, _ in g["docpipe.execute.plan"]}  # inside execute_ray()
    assert "docpipe.execute.stages" in {t for t, _ in g["docpipe.execute.local"]}
    [tools_rule] = [allowed for rule, _, forbidden, allowed in RULES if forbidden == ["docpipe.tools"]]
    assert let_through("docpipe.execute.train", "docpipe.tools.finetune", tools_rule)
    assert not let_through("docpipe.execute.plan", "docpipe.tools.finetune", tools_rule)
    assert not let_through("docpipe.execute.train", "docpipe.tools.bench", tools_rule)


def _light(code: str, tmp_path: Path) -> list[str]:
    """Run ``code`` in a fresh interpreter; the heavy modules it loaded."""
    probe = f"import sys\n{code}\nprint('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("HEAVY=")][-1]
    return [m for m in line[len("HEAVY="):].split(",") if m]


def test_config_schema_stays_light(tmp_path):
    loaded = _light("from docpipe.cli import main\nassert main(['config', 'schema']) == 0", tmp_path)
    assert not loaded, f"`docpipe config schema` imported {loaded}"


def test_eval_stays_light(tmp_path):
    """`docpipe eval` scores an output against labels without the model, the renderers or Ray."""
    from docpipe.schemas import PAGES_SCHEMA

    out = tmp_path / "out"
    (out / "pages").mkdir(parents=True)
    row = {"doc_id": "a", "source_uri": "file:///a.pdf", "page_number": 1, "page_count": 1, "status": "ok",
           "text": "hello world", "text_source": "model", "run_id": "20260101T000000Z-abcdef", "schema_version": 4}
    pq.write_table(pa.Table.from_pylist([row], schema=PAGES_SCHEMA), out / "pages" / "part-0.parquet")
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"source_uri": "file:///a.pdf", "page_number": 1, "text": "hello world"}) + "\n")
    report = tmp_path / "eval.json"
    loaded = _light(f"from docpipe.cli import main\nassert main(['eval', {str(out)!r}, '--labels', {str(labels)!r}, "
                    f"'--json', {str(report)!r}]) == 0", tmp_path)
    assert json.loads(report.read_text())["cer"] == 0.0, report.read_text()
    assert not loaded, f"`docpipe eval` imported {loaded}"
