"""The library's layers point one way: the numerical core imports neither gin, matplotlib nor
anything above it, and ``import zoo`` selects no plotting backend.

The import graph is read from the source (every ``import`` statement, function-local ones
included), so a cycle dodged by a late import is caught too.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "zoo"

#: The numerical core and the base utilities it stands on. Everything else (training, io,
#: plotting, the experiments, the command line) may import these, never the reverse.
CORE = (
    "zoo._types",
    "zoo._version",
    "zoo._xla",
    "zoo._workers",
    "zoo.errors",
    "zoo.resources",
    "zoo.chunking",
    "zoo.parallel",
    "zoo.progress",
    "zoo.storage",
    "zoo.data",
    "zoo.systems",
    "zoo.fields",
    "zoo.flows",
    "zoo.losses",
    "zoo.metrics",
    "zoo.optim",
)
FORBIDDEN_IN_CORE = ("gin", "matplotlib")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def in_core(module: str) -> bool:
    return any(module == c or module.startswith(c + ".") for c in CORE)


def imports_of(path: Path, modules=()) -> set[str]:
    """Every module an import statement anywhere in the file loads.

    ``from a import b`` loads the module ``a.b`` when there is one (one of ``modules``), else ``a``.
    """
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return found


def zoo_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "_shipped" not in p.parts}


def test_the_core_imports_nothing_above_it():
    modules = zoo_modules()
    core = {name: path for name, path in modules.items() if in_core(name)}
    assert {"zoo.losses.pg", "zoo.metrics", "zoo.systems.alanine", "zoo.flows.cnf"} <= set(core)
    violations = []
    for name, path in sorted(core.items()):
        for imported in sorted(imports_of(path, modules)):
            top = imported.split(".")[0]
            if top in FORBIDDEN_IN_CORE:
                violations.append(f"{name} imports {imported}")
            elif imported == "zoo":  # the package itself is the public API, above the core
                violations.append(f"{name} imports the zoo package (the public API layer)")
            elif top == "zoo" and not in_core(imported):
                violations.append(f"{name} imports {imported}")
    assert not violations, "imports against the layering:\n" + "\n".join(violations)


def test_the_checker_sees_a_violation(tmp_path):
    """The reader of import statements finds late, nested and from-imports."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    if True:\n        from zoo.plotting import views\n        from zoo import __version__\n    import gin.config\n")
    assert imports_of(source, modules={"zoo.plotting.views"}) == {"zoo.plotting.views", "zoo", "gin.config"}


@pytest.mark.parametrize("statement", ["import zoo", "import zoo, zoo.plotting.views, zoo.plotting.plots, zoo.experiments.runs, zoo.experiments.compare, zoo.experiments.finetune"])
def test_importing_zoo_selects_no_plotting_backend(statement):
    code = f"{statement}; import sys; print('matplotlib.pyplot' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.stdout.strip() == "False"


def test_every_subpackage_is_packaged():
    """pyproject lists its packages by hand: a new subpackage left out would be missing from
    the wheel (and every install but an editable one)."""
    import tomllib

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {module_name(init) for init in PACKAGE.rglob("__init__.py") if "_shipped" not in init.parts}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
