"""One home per concept (issue 29 item 9): the duplicates a review found stay gone.

Read from the source, not run: what is checked is where things are defined and who imports whom.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import vicuna

SRC = Path(vicuna.__file__).parent


def modules() -> dict[str, Path]:
    out = {}
    for f in SRC.rglob("*.py"):
        parts = f.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the vicuna modules it imports, at the top or inside a function."""
    mods = modules()
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        package = m if f.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                for alias in node.names:
                    graph[m].add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base)
            elif isinstance(node, ast.Import):
                graph[m].update(a.name for a in node.names)
        graph[m] = {t for t in graph[m] if t in mods and t != m}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_import_cycle_through_the_weights_package():
    """train/checkpoint.py -> weights -> weights/cli.py -> train/checkpoint.py was kept alive by re-exports."""
    found = cycles(import_graph())
    assert not [c for c in found if "vicuna.train.checkpoint" in c or "vicuna.weights" in c], found
    text = "\n".join(f.read_text() for f in modules().values())
    assert "Transitional" not in text  # errors come from vicuna.errors, nowhere else


def test_public_class_names_are_unique():
    where = defaultdict(list)
    for m, f in modules().items():
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                where[node.name].append(m)
    assert not {k: v for k, v in where.items() if len(v) > 1}


def test_one_fsync_dir_and_no_flags_in_library_code():
    defs = [m for m, f in modules().items() for node in ast.walk(ast.parse(f.read_text()))
            if isinstance(node, ast.FunctionDef) and node.name.lstrip("_") == "fsync_dir"]
    assert defs == ["vicuna.files"]
    model = (SRC / "model.py").read_text()
    assert "add_argument" not in model and "args." not in model  # `vicuna chat` uses serve/launch.py's flags


def test_defaults_live_in_one_place():
    """The 512-token completion budget and the 0.7 temperature fallback: generation.py's constants;
    the eval endpoint's timeout/retries/backoff: eval/openai_client.py's."""
    budget = re.compile(r"max.(new.)?tokens.*\b512\b")
    temperature = re.compile(r"temperature[^=\n]*=\s*0\.7\b")
    endpoint = re.compile(r"\b(timeout|retries|backoff)\b.*\b(120(\.0)?|5|1\.0)\)")
    hits = []
    for m, f in modules().items():
        for n, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if budget.search(code) and "DEFAULT_MAX_NEW_TOKENS =" not in code:
                hits.append(f"{m}:{n}: {line.strip()}")
            if m == "vicuna.generation" and temperature.search(code):
                hits.append(f"{m}:{n}: {line.strip()}")
            if m.startswith("vicuna.eval") and endpoint.search(code):
                hits.append(f"{m}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_generate_request_has_no_unused_from_dict():
    from vicuna.serve.core import GenerateRequest

    assert not hasattr(GenerateRequest, "from_dict")
