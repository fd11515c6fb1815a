"""The package's layers (docs/architecture.md), enforced on its import graph:

    cli, errors      entry point; the error types
    core             labels, prompts, sampling, io, settings ... : imports only core (and errors)
    llm              request log, identities, backends, embedded model: core and llm
    evaluation       metrics, answers, baselines, predictions files: core, llm, evaluation
    derivation       an .h5ad screen to tuples (checks, DE tests, calls): core, derivation
    steps            one module per subcommand: core, llm, evaluation, derivation; never another step
    tools            ask, screen: core, llm, evaluation, tools

Every import counts, those inside functions too; no circle, even inside a layer; and no
module outside llm/ computes a request key.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import synthpert
from synthpert.cli import COMMANDS

PACKAGE = Path(synthpert.__file__).parent
ALLOWED = {
    "errors": set(),
    "core": {"core", "errors"},
    "llm": {"core", "llm", "errors"},
    "evaluation": {"core", "llm", "evaluation", "errors"},
    "derivation": {"core", "derivation", "errors"},
    "steps": {"core", "llm", "evaluation", "derivation", "errors"},
    "tools": {"core", "llm", "evaluation", "tools", "errors"},
    "cli": {"errors"},
    "__main__": {"cli"},
    "__init__": set(),
}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(("synthpert", *parts))] = path
    return found


def layer(module: str) -> str:
    return module.split(".")[1]


def package_imports(path: Path) -> list[str]:
    """The synthpert modules a file imports (`from synthpert.x import y` counts x.y when it is a module)."""
    imported = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported += [a.name for a in node.names if a.name.startswith("synthpert")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("synthpert"):
            assert node.level == 0, f"{path}: relative import"
            names = [f"{node.module}.{a.name}" for a in node.names]
            imported += [n for n in names if n in modules()] or [node.module]
    return imported


@pytest.mark.parametrize("module", sorted(modules()))
def test_module_imports_only_the_layers_below(module):
    own = layer(module)
    assert own in ALLOWED, f"{module}: not in a known layer {sorted(ALLOWED)}"
    for imported in package_imports(modules()[module]):
        target = layer(imported) if imported != "synthpert" else "__init__"
        assert target in ALLOWED[own] or imported == module, f"{module} imports {imported} ({own} -> {target})"
        if own == "steps" and target == "steps":
            pytest.fail(f"step {module} imports another step {imported}")


def test_every_subcommand_is_a_step_or_a_tool_named_like_it():
    for name, (module, _) in COMMANDS.items():
        assert layer(module) in ("steps", "tools"), module
        assert module.rsplit(".", 1)[1] == name.replace("-", "_"), f"synthpert {name} lives in {module}"
    steps = {m.rsplit(".", 1)[1] for m in modules() if layer(m) == "steps" and not m.endswith("__init__")}
    assert steps <= {n.replace("-", "_") for n in COMMANDS}, "a module of steps/ that is no subcommand"


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (a package's `__init__` for `import synthpert`)."""
    known = modules()
    return {
        module: {m for m in package_imports(path) if m in known and m != module}
        for module, path in known.items()
    }


def test_no_import_circle_even_inside_a_layer():
    """A circle (llm.backends -> llm.local -> llm.backends, as there was) means no module
    of it can be read, or changed, without the others: each concept has one owner below."""
    graph = import_graph()
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                circle = path[path.index(imported):] + [imported]
                pytest.fail("import circle: " + " -> ".join(circle))
            if imported not in state:
                visit(imported)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_circle_check_finds_a_circle(monkeypatch):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    monkeypatch.setattr(sys.modules[__name__], "import_graph", lambda: graph)
    with pytest.raises(pytest.fail.Exception, match="a -> b -> c -> a"):
        test_no_import_circle_even_inside_a_layer()


KEY_CALLS = {"key", "legacy_keys"}  # llm.requests.Request's: the request key scheme
KEY_HELPERS = {"final_keys", "_digest"}


def key_uses(path: Path) -> list[str]:
    """Where a file computes a request key: calls of `.key(...)` / `.legacy_keys(...)`, or
    imports of the key helpers of llm.requests."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in KEY_CALLS:
            found.append(f"line {node.lineno}: .{node.func.attr}(...)")
        elif isinstance(node, ast.ImportFrom) and node.module == "synthpert.llm.requests":
            found += [f"line {node.lineno}: imports {a.name}" for a in node.names if a.name in KEY_HELPERS]
    return found


@pytest.mark.parametrize("module", sorted(m for m in modules() if layer(m) != "llm"))
def test_no_request_key_is_computed_outside_llm(module):
    """The key scheme stays inside llm/: backends answer in request order
    (`llm.requests.run_requests`) and the plan asks `llm.requests.answered_in`."""
    assert not key_uses(modules()[module]), f"{module} computes request keys: {key_uses(modules()[module])}"


def test_the_key_check_finds_a_key(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from synthpert.llm.requests import final_keys\nkeys = {r.key(model) for r in requests}\n")
    assert key_uses(source) == ["line 1: imports final_keys", "line 2: .key(...)"]
