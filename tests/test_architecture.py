"""The package's shape, as docs/architecture.md promises it: no import cycles, imports at module level
(function-level only for optional heavy dependencies), modules of at most 400 lines, and no comparison
of family names outside ``mllm_jax/families``."""

from __future__ import annotations

import ast
import os
import re

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mllm_jax")
MAX_LINES = 400
FAMILY_NAMES = ("llava", "idefics", "blip2", "vit", "llm", "opt")


def modules() -> dict[str, str]:
    """Dotted module name -> file path, for every module of the package."""
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def imports(path: str, known: dict[str, str]) -> list[tuple[str, bool]]:
    """``(module, at_module_level)`` for each of our modules ``path`` imports; ``from P import name``
    depends on ``P.name`` when that is a module, else on ``P``."""
    tree = ast.parse(open(path).read())
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                for a in node.names
            ]
        else:
            continue
        out += [(n, id(node) in top) for n in names if n.split(".")[0] == "mllm_jax"]
    return out


def test_no_import_cycles_and_no_function_level_imports_of_our_modules():
    known = modules()
    graph = {}
    for name, path in known.items():
        deps = imports(path, known)
        late = sorted({d for d, top in deps if not top})
        assert not late, f"{name} imports {late} inside a function: import our modules at the top"
        graph[name] = {d for d, _ in deps if d in known and d != name}
    # Tarjan's strongly connected components: a component of two or more modules is a cycle
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_modules_are_at_most_400_lines_and_no_setup_module():
    long = {n: sum(1 for _ in open(p)) for n, p in modules().items()}
    assert {n: c for n, c in long.items() if c > MAX_LINES} == {}
    assert "mllm_jax.setup" not in modules()


def test_family_names_are_compared_only_in_families():
    pattern = re.compile(
        r"""(?:[=!]=|\bin)\s*\(?["'](?:%s)["']|["'](?:%s)["']\s*[=!]=""" % (("|".join(FAMILY_NAMES),) * 2)
    )
    offenders = []
    for name, path in modules().items():
        if name.startswith("mllm_jax.families"):
            continue
        for i, line in enumerate(open(path), 1):
            code = line.split("#", 1)[0]
            if pattern.search(code) and "model_type" not in code:  # HF model types are the hf tables' own
                offenders.append(f"{name}:{i}: {line.strip()}")
    assert offenders == []
