"""The package's layers (docs/architecture.md), enforced on its import graph:

    cli, errors      entry point; the error types
    core             labels, prompts, sampling, io, settings ... : imports only core (and errors)
    llm              request log, identities, backends, embedded model: core and llm
    evaluation       metrics, answers, baselines, predictions files: core, llm, evaluation
    derivation       an .h5ad screen to tuples (checks, DE tests, calls): core, derivation
    steps            one module per subcommand: core, llm, evaluation, derivation; never another step
    tools            ask, screen: core, llm, evaluation, tools

Every import counts, those inside functions too.
"""

from __future__ import annotations

import ast
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
