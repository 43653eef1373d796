"""The import graph of megavq follows its layer table (docs/extending.md): a module imports only from lower
layers, and at its own layer only inside its own package (the table's entry). Every `import megavq...` and
`from megavq... import` statement counts, at module level or inside a function. A function-local megavq import
is allowed only where it is marked with the reason (`# lazy: ...`)."""
import ast
from pathlib import Path

import pytest
from conftest import ROOT

# entry (a package, or a group of top-level modules) -> layer
LAYERS = {
    ("megavq.errors", "megavq.files"): 0,
    ("megavq.compat",): 1,
    ("megavq.moe",): 2,
    ("megavq.config", "megavq.plugins"): 3,
    ("megavq.model",): 4,
    ("megavq.data",): 4,
    ("megavq.store",): 5,
    ("megavq.convert",): 6,
    ("megavq.train",): 6,
    ("megavq.eval",): 7,
    ("megavq.lm_eval_tasks",): 7,
    ("megavq.tools",): 8,
    ("megavq",): 9,  # megavq/__init__.py: the public names
}


def megavq_modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(root: Path) -> list[tuple[str, str, int, bool]]:
    """(importing module, imported module, line, inside a function) of every megavq import."""
    modules = megavq_modules(root)

    def owner(name: str) -> str | None:  # the module a dotted name refers to (a module, or a name in one)
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None
    out = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f)}
        for node in ast.walk(tree):
            targets = set()
            if isinstance(node, ast.Import):
                targets = {owner(a.name) for a in node.names if a.name.startswith("megavq")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [base] * bool(base))
                if base.startswith("megavq"):
                    targets = {owner(f"{base}.{a.name}") for a in node.names}
            out += [(name, t, node.lineno, id(node) in local) for t in targets - {None, name}]
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    graph = {name: set() for name in megavq_modules(root)}
    for src, dst, _, _ in imports(root):
        graph[src].add(dst)
    return graph


def entry(module: str) -> tuple[tuple[str, ...], int]:
    """The table's entry of a module (the longest prefix that names one) and its layer."""
    best = max((e for e in LAYERS for m in e if module == m or module.startswith(m + ".")),
               key=lambda e: max(len(m) for m in e if module == m or module.startswith(m + ".")))
    return best, LAYERS[best]


def violations(edges, layer_of=entry) -> list[str]:
    out = []
    for src, dst, line, _ in edges:
        (e_src, l_src), (e_dst, l_dst) = layer_of(src), layer_of(dst)
        if l_dst > l_src or (l_dst == l_src and e_src != e_dst):
            out.append(f"{src}:{line} (L{l_src}) imports {dst} (L{l_dst})")
    return sorted(out)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                found.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"
    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_every_module_has_a_layer():
    for module in megavq_modules(ROOT / "megavq"):
        assert entry(module)[0] != ("megavq",) or module == "megavq", f"{module} is in no entry of LAYERS"


def test_imports_follow_the_layers():
    found = violations(imports(ROOT / "megavq"))
    assert found == [], "upward or sideways imports:\n" + "\n".join(found)


def test_function_local_imports_say_why():
    bad = []
    for src, dst, line, local in imports(ROOT / "megavq"):
        text = (ROOT / "megavq").parent.joinpath(*src.split(".")).with_suffix(".py")
        path = text if text.is_file() else text.with_suffix("") / "__init__.py"
        if local and "# lazy:" not in path.read_text().splitlines()[line - 1]:
            bad.append(f"{src}:{line} imports {dst} inside a function without a `# lazy:` reason")
    assert bad == [], "\n".join(bad)


def test_the_import_graph_has_no_cycle():
    graph = import_graph(ROOT / "megavq")
    assert len(graph) > 40 and {"megavq.moe.routers", "megavq.moe.dispatch"} <= graph["megavq.moe.layer"]
    assert cycles(graph) == [], "\n".join(" -> ".join(c) for c in cycles(graph))


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


@pytest.mark.parametrize("src, dst", [("megavq.model.transformer", "megavq.train.engine"),
                                      ("megavq.moe.layer", "megavq.config"),
                                      ("megavq.model.generate", "megavq.data.tokenizer")])
def test_an_upward_or_sideways_import_is_found(tmp_path, src, dst):
    """A copy of the package with one more import (inside a function) fails the layering check."""
    import shutil
    shutil.copytree(ROOT / "megavq", tmp_path / "megavq")
    path = tmp_path.joinpath(*src.split(".")).with_suffix(".py")
    path.write_text(path.read_text() + f"\n\ndef _added():\n    import {dst}  # lazy: test\n")
    found = violations(imports(tmp_path / "megavq"))
    assert [v for v in found if v.startswith(src) and dst in v], found
