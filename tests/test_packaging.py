"""One import namespace (llamoe.*) and imports that point one way.

The repository's top-level folders are the packages llamoe.attention, llamoe.moe, llamoe.models and
llamoe.experiments (pyproject's package-dir maps llamoe to the root). These tests read every import
statement of the tree, function-level ones included, and check: nothing imports a bare `models`,
`experiments`, ... (which would be llama-models' or a user's package once installed), the module graph
has no cycle, and every import goes down the layers below (or stays inside its own group).
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("attention", "moe", "models", "experiments")
OLD_TOP_LEVEL = {*PACKAGE_DIRS, "config_error"}

# Lowest first. A module may import its own group, or a group of a lower rank; groups of one rank are
# independent of each other (attention and moe never import one another).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("llamoe.config_error", "llamoe.experiments"),  # the one ConfigError; experiments/__init__.py (empty)
    ("llamoe.attention", "llamoe.moe"),
    ("llamoe.models",),
    ("llamoe.experiments.errors", "llamoe.experiments.overrides"),
    ("llamoe.experiments.data",),
    ("llamoe.experiments.evals",),  # metrics and the suite: a model and a tokenizer in, numbers out
    ("llamoe.experiments.config",),  # RunConfig composes the configs data/ and evals/ own
    ("llamoe.experiments.train",),  # loop, optimizer, checkpoints, run control, DeepSpeed, model sources
    ("llamoe.experiments.sweeps",),  # spec, scheduler, Slurm, report, statistics
    ("llamoe.experiments.commands",),  # `llamoe train | eval | ablate | plan | bench | convert | generate`
    ("llamoe.experiments.cli",),
)


def _modules() -> dict[str, Path]:
    """Every module of the distribution: dotted llamoe name -> file."""
    out = {"llamoe.config_error": ROOT / "config_error.py"}
    for top in PACKAGE_DIRS:
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(["llamoe", *parts])] = path
    return out


MODULES = _modules()


def _imported(path: Path, name: str) -> list[tuple[str, int]]:
    """(module imported, line) for every import statement in the file, resolved to modules where possible."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub if sub in MODULES else base, node.lineno))
    return out


def _group(module: str) -> str:
    """The longest group name that is the module or a package above it."""
    groups = [g for rank in LAYERS for g in rank if module == g or module.startswith(g + ".")]
    if groups:
        return max(groups, key=len)
    raise AssertionError(f"{module} is in no layer of tests/test_packaging.py; add its package to LAYERS")


RANK = {group: i for i, rank in enumerate(LAYERS) for group in rank}


def _graph() -> dict[str, set[str]]:
    return {name: {m for m, _ in _imported(path, name) if m in MODULES and m != name} for name, path in MODULES.items()}


def test_no_file_imports_the_old_top_level_names() -> None:
    """`import models` would be llama-models' package (or a user's) once llamoe is installed."""
    files = [*MODULES.values(), *ROOT.glob("tests/**/*.py"), *ROOT.glob("benchmarks/*.py")]
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in files
        for module, line in _imported(path, "tests.x")
        if module.split(".")[0] in OLD_TOP_LEVEL
    ]
    assert not bad, bad


def test_the_packages_pyproject_installs_are_the_folders() -> None:
    block = re.search(r"^packages = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), flags=re.S | re.M)
    assert block, "pyproject.toml lists no [tool.setuptools] packages"
    listed = set(re.findall(r'"([a-z_.]+)"', block.group(1)))
    folders = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert listed == {"llamoe", *folders}


def test_the_module_graph_has_no_cycle() -> None:
    try:
        order = list(TopologicalSorter(_graph()).static_order())
    except CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")
    assert set(order) == set(MODULES)


def _upward(name: str, imported: list[str]) -> list[str]:
    """The imports of module `name` that go up the layers or sideways into another group of its rank."""
    src = _group(name)
    out = []
    for module in imported:
        dst = _group(module)
        if dst != src and RANK[dst] >= RANK[src]:
            out.append(f"{src} imports {module} ({dst})")
    return out


def test_imports_point_down_the_layers() -> None:
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {problem}"
        for name, path in MODULES.items()
        for module, line in _imported(path, name)
        if module in MODULES
        for problem in _upward(name, [module])
    ]
    assert not bad, bad


def test_the_layer_rule_refuses_what_it_must() -> None:
    """Positive control: an upward import, a sideways one, and the circle the namespace issue removed
    (config validation importing init_from, which imports checkpoint, which imports config)."""
    assert _upward("llamoe.models.layers", ["llamoe.experiments.train.loop"])
    assert _upward("llamoe.moe.layer", ["llamoe.attention.attention"])
    assert _upward("llamoe.experiments.config", ["llamoe.experiments.train.init_from"])
    assert not _upward("llamoe.experiments.train.loop", ["llamoe.models.transformer", "llamoe.experiments.config"])


@pytest.mark.slow
def test_every_module_imports_in_dependency_order_in_a_fresh_interpreter(tmp_path: Path) -> None:
    """Deps first, one module at a time, from a directory where no top-level folder of the repo is visible."""
    order = [m for m in TopologicalSorter(_graph()).static_order()]
    script = (
        "import importlib, json, sys\n"
        f"for name in json.loads({json.dumps(json.dumps(order))}):\n"
        "    importlib.import_module(name)\n"
        f"stray = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(OLD_TOP_LEVEL)!r})\n"
        "assert not stray, stray\n"
        "print(len(sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
