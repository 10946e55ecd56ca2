"""Reading the house plan from the code: layers, pure cores, deferred imports and names.

Each check returns the violations it finds (empty when the code follows the plan), so the
tests in ``test_architecture.py`` can run it on the project and on planted trees alike.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Upper layers may import lower ones, never the other way. The pure cores are the floor.
LAYERS = ("core", "embeddings", "search", "evaluation", "portal")
APPS = LAYERS[1:]
CORES = ("embeddings.core", "search.core", "evaluation.core")
# Libraries heavy enough (or optional enough) that a module may import them where used.
HEAVY = {"torch", "onnx", "onnxruntime", "faiss", "pymilvus", "transformers", "matplotlib", "tqdm", "gunicorn",
         "psycopg", "sentencepiece", "safetensors", "tokenizers", "redis", "playwright", "optimum", "cv2", "av"}
# Modules that may queue Celery tasks: the entry points. Services below them return instead.
ENTRY_POINTS = ("views", "admin", "api", "management", "tasks", "apps", "urls", "gunicorn")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported module (``from x import y`` reads as ``x.y`` when y is a module)
    line: int
    deferred: bool  # inside a function
    renamed: bool


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_files(root: Path = ROOT):
    for app in APPS:
        for path in sorted((root / app).rglob("*.py")):
            if "migrations" not in path.parts:
                yield path


def imports_of(path: Path, root: Path) -> list[Import]:
    module = module_name(path, root)
    found = []

    def visit(node, deferred):
        for child in ast.iter_child_nodes(node):
            inner = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend(Import(module, a.name, child.lineno, deferred, a.asname is not None) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                for a in child.names:
                    target = f"{child.module}.{a.name}"
                    is_module = (root / Path(*target.split("."))).with_suffix(".py").exists() or \
                        (root / Path(*target.split("."))).is_dir()
                    found.append(Import(module, target if is_module else child.module, child.lineno, deferred,
                                        a.asname is not None))
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return found


def layer(module: str) -> str | None:
    if any(module == c or module.startswith(c + ".") for c in CORES):
        return "core"
    top = module.split(".")[0]
    return top if top in APPS else None


def all_imports(root: Path = ROOT) -> list[Import]:
    return [imp for path in project_files(root) for imp in imports_of(path, root)]


def upward_imports(imports) -> list[str]:
    """Imports of a higher layer (a core importing an app counts: cores import only cores)."""
    bad = []
    for imp in imports:
        here, there = layer(imp.module), layer(imp.target)
        if here and there and LAYERS.index(there) > LAYERS.index(here):
            bad.append(f"{imp.module}:{imp.line} imports {imp.target} ({here} → {there})")
        elif here == "core" and imp.target.split(".")[0] in {"django", "rest_framework", "celery"}:
            bad.append(f"{imp.module}:{imp.line} imports {imp.target} (a core imports no Django)")
    return bad


def deferred_project_imports(imports) -> list[str]:
    """Imports inside functions that defer no heavy library: only cores (which load torch) and
    the libraries in HEAVY may be imported where used."""
    bad = []
    for imp in imports:
        if not imp.deferred or imp.target.split(".")[0] in HEAVY:
            continue
        if layer(imp.target) in APPS:
            bad.append(f"{imp.module}:{imp.line} imports {imp.target} inside a function")
    return bad


def tasks_queued_by_services(imports) -> list[str]:
    """Services never import task modules: they return, and an entry point queues."""
    bad = []
    for imp in imports:
        if imp.target.split(".")[-1] == "tasks" or ".tasks." in imp.target + ".":
            if not any(part in ENTRY_POINTS for part in imp.module.split(".")):
                bad.append(f"{imp.module}:{imp.line} imports {imp.target}")
    return bad


def renamed_project_imports(imports) -> list[str]:
    return [f"{imp.module}:{imp.line} renames {imp.target}" for imp in imports
            if imp.renamed and layer(imp.target)]


def import_circles(imports) -> list[list[str]]:
    """Circles among modules through their top-level imports (strongly connected parts)."""
    graph = defaultdict(set)
    for imp in imports:
        if not imp.deferred and layer(imp.target) and imp.target != imp.module:
            graph[imp.module].add(imp.target)
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def connect(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            part = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                part.append(top)
                if top == node:
                    break
            if len(part) > 1:
                circles.append(sorted(part))

    for node in list(graph):
        if node not in index:
            connect(node)
    return circles


def name_twins(root: Path = ROOT) -> dict[str, list[str]]:
    """Public top-level functions and classes defined in more than one module."""
    where = defaultdict(list)
    for path in project_files(root):
        if "management" in path.parts:
            continue  # every command is a class named Command
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                where[node.name].append(module_name(path, root))
    return {name: modules for name, modules in where.items() if len(modules) > 1}
