"""The package's layers, enforced on every module's imports (issue 13).

Every module of ``fedjaxsim`` is parsed with ``ast`` (nothing is imported),
its imports are resolved (relative imports, ``from package import module``,
imports inside functions, ``importlib.import_module("...")`` with a literal),
and each is checked against the rules below:

* ``core`` (the engine included) imports nothing from the layers above it:
  algorithms, runner, data, privacy, robust, compression, models, testing.
* ``algorithms`` never import the runner or data loading, never pack cohorts
  (no ``pack_*`` function of ``core.packing``; a constant is fine), and never
  do I/O.
* ``models`` never read the engine (no ``core.engine``, no runner): the
  convolution lowering is chosen when the model is built.
* ``privacy``, ``robust`` and ``compression`` never reach into one another's
  private modules (or private names).
* ``data`` never imports algorithms, the runner or the engine.
* Pure code (``core`` and ``algorithms``) imports no I/O library and never
  prints, logs, calls ``jax.device_get`` or changes JAX's global config.

Importing the package root (``import fedjaxsim``) pulls in every layer it
re-exports, so only the runner and the testing helpers may.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "fedjaxsim"
ROOT = "fedjaxsim"

IO_MODULES = frozenset(
    {
        "tensorflow",
        "tensorflow_datasets",
        "orbax",
        "h5py",
        "sqlite3",
        "logging",
        "tqdm",
        "matplotlib",
        "tensorboardX",
        "pickle",
        "urllib",
        "requests",
        "shutil",
        "subprocess",
    }
)
IO_CALLS = frozenset({"print", "device_get", "open"})
EXTENSIONS = ("privacy", "robust", "compression")


class Import(NamedTuple):
    module: str  # the imported module, resolved ("fedjaxsim.core.trees", "numpy")
    name: str | None  # the name taken from it by a from-import; None for a module
    line: int


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    return {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


MODULES = package_modules()


def resolve_imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> list[Import]:
    """Every import in ``tree`` (a module's source), resolved to module names.

    ``from fedjaxsim.core import packing`` names the module
    ``fedjaxsim.core.packing``; ``from fedjaxsim.core.packing import
    pack_cohort`` names ``pack_cohort`` from it.
    """
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in known:
                    found.append(Import(submodule, None, node.lineno))
                else:
                    found.append(Import(source, alias.name, node.lineno))
        elif (
            isinstance(node, ast.Call)
            and _called_name(node) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append(Import(node.args[0].value, None, node.lineno))
    return found


def _called_name(node: ast.Call) -> str | None:
    func = node.func
    return func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)


def _within(module: str, layer: str) -> bool:
    return module == layer or module.startswith(layer + ".")


def _layer(*parts: str) -> str:
    return ".".join((ROOT, *parts))


def _is_private_module(module: str, extension: str) -> bool:
    inside = module[len(_layer(extension)) + 1 :].split(".") if module != _layer(extension) else []
    return any(part.startswith("_") and part != "__init__" for part in inside)


def layer_violations(module: str, imported: Import) -> list[str]:
    """The layer rules ``imported`` breaks when ``module`` imports it."""
    target, name = imported.module, imported.name
    where = f"{module} (line {imported.line}) imports {target}" + (f".{name}" if name else "")
    found = []

    def forbid(layers, why):
        if any(_within(target, _layer(*layer.split("."))) for layer in layers):
            found.append(f"{where}: {why}")

    may_import_root = module == ROOT or any(
        _within(module, _layer(layer)) for layer in ("runner", "testing")
    )
    if target == ROOT and not may_import_root:
        found.append(f"{where}: the package root re-exports every layer")

    if _within(module, _layer("core")):
        forbid(
            [
                "algorithms",
                "runner",
                "data",
                "privacy",
                "robust",
                "compression",
                "models",
                "testing",
            ],
            "core imports nothing from the layers above it",
        )
    if _within(module, _layer("algorithms")):
        forbid(["runner", "data", "testing"], "algorithms never load data or run experiments")
        packing = _layer("core", "packing")
        if target == packing and (name is None or name.startswith("pack")):
            found.append(f"{where}: algorithms never pack cohorts (the engine's caller does)")
    if _within(module, _layer("models")):
        forbid(
            ["core.engine", "runner", "algorithms"], "models never read the engine or the runner"
        )
    for extension in EXTENSIONS:
        others = [other for other in EXTENSIONS if other != extension]
        if _within(module, _layer(extension)):
            for other in others:
                if _within(target, _layer(other)) and (
                    _is_private_module(target, other) or (name or "").startswith("_")
                ):
                    found.append(f"{where}: {extension} reaches into {other}'s private parts")
    if _within(module, _layer("data")):
        forbid(
            ["algorithms", "runner", "core.engine"], "data never imports algorithms or the engine"
        )
    return found


def io_violations(module: str, tree: ast.AST, imports: list[Import]) -> list[str]:
    """Pure code: no I/O library, no printing, no host sync, no global config."""
    found = [
        f"{module} (line {i.line}) imports {i.module}: pure code does no I/O"
        for i in imports
        if i.module.split(".")[0] in IO_MODULES
    ]
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            called = _called_name(node)
            func = node.func
            if called in IO_CALLS:
                found.append(f"{module} (line {node.lineno}) calls {called}: pure code does no I/O")
            if (
                called == "update"
                and isinstance(func, ast.Attribute)
                and getattr(func.value, "attr", getattr(func.value, "id", None)) == "config"
            ):
                found.append(
                    f"{module} (line {node.lineno}) changes jax.config: library code never does"
                )
    return found


def check_source(source: str, module: str, is_package: bool = False, known=None) -> list[str]:
    """Every rule broken by ``source``, read as the module ``module``."""
    tree = ast.parse(source)
    imports = resolve_imports(tree, module, is_package, set(MODULES) if known is None else known)
    found = [message for imported in imports for message in layer_violations(module, imported)]
    if _within(module, _layer("core")) or _within(module, _layer("algorithms")):
        found += io_violations(module, tree, imports)
    return found


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_keeps_to_its_layer(module):
    path = MODULES[module]
    assert check_source(path.read_text(), module, path.name == "__init__.py") == []


def test_the_checker_sees_every_layer():
    """Guards against a vacuous pass: the rules' scopes all hold modules, the
    engine package is included (not only top-level files), and imports are
    resolved as they are written."""
    for layer in ("core", "core.engine", "algorithms", "models", "data", *EXTENSIONS):
        assert any(_within(m, _layer(*layer.split("."))) for m in MODULES), layer
    assert {
        "fedjaxsim.core.engine.round",
        "fedjaxsim.core.packing",
        "fedjaxsim.algorithms.fed_avg",
    } <= set(MODULES)
    round_module = "fedjaxsim.core.engine.round"
    tree = ast.parse(MODULES[round_module].read_text())
    imported = {
        (i.module, i.name) for i in resolve_imports(tree, round_module, False, set(MODULES))
    }
    assert ("fedjaxsim.core.engine.chunks", "train_lanes") in imported
    # Relative imports and from-package-import-module resolve to modules.
    tree = ast.parse("from ..trees import tree_add\nfrom .. import packing\nfrom . import lanes")
    imported = {
        (i.module, i.name) for i in resolve_imports(tree, round_module, False, set(MODULES))
    }
    assert imported == {
        ("fedjaxsim.core.trees", "tree_add"),
        ("fedjaxsim.core.packing", None),
        ("fedjaxsim.core.engine.lanes", None),
    }


@pytest.mark.parametrize(
    "module, source, expected",
    [
        (
            "fedjaxsim.core.engine.round",
            "from fedjaxsim.algorithms.fed_avg import fed_avg",
            "core imports nothing",
        ),
        ("fedjaxsim.core.engine.round", "from ...runner import config", "core imports nothing"),
        ("fedjaxsim.core.trees", "import fedjaxsim.data.digits", "core imports nothing"),
        ("fedjaxsim.core.trees", "from fedjaxsim import models", "core imports nothing"),
        ("fedjaxsim.core.trees", "from fedjaxsim import fed_avg", "root re-exports"),
        ("fedjaxsim.robust.attacks", "import fedjaxsim", "root re-exports"),
        (
            "fedjaxsim.core.trees",
            "def f():\n    from fedjaxsim.privacy import accounting",
            "core imports nothing",
        ),
        (
            "fedjaxsim.core.trees",
            "import importlib\nimportlib.import_module('fedjaxsim.robust')",
            "core imports",
        ),
        ("fedjaxsim.core.trees", "import logging", "no I/O"),
        ("fedjaxsim.core.trees", "print(1)", "calls print"),
        ("fedjaxsim.core.trees", "jax.config.update('jax_enable_x64', True)", "changes jax.config"),
        (
            "fedjaxsim.algorithms.fed_avg",
            "from fedjaxsim.core.packing import pack_cohort",
            "never pack",
        ),
        (
            "fedjaxsim.algorithms.fed_avg",
            "from ..core.packing import pack_fine_tune_then_test",
            "never pack",
        ),
        ("fedjaxsim.algorithms.fed_avg", "from fedjaxsim.core import packing", "never pack"),
        (
            "fedjaxsim.algorithms.fed_avg",
            "from fedjaxsim.runner.config import load_config",
            "never load data",
        ),
        ("fedjaxsim.algorithms.fed_avg", "from fedjaxsim.data import digits", "never load data"),
        ("fedjaxsim.algorithms.fed_avg", "import orbax.checkpoint", "no I/O"),
        ("fedjaxsim.algorithms.fed_avg", "x = jax.device_get(y)", "calls device_get"),
        (
            "fedjaxsim.models.conv",
            "from fedjaxsim.core.engine.plan import ExecutionPlan",
            "never read the engine",
        ),
        ("fedjaxsim.models.conv", "from fedjaxsim.core import engine", "never read the engine"),
        ("fedjaxsim.models.zoo", "from fedjaxsim.runner import platform", "never read the engine"),
        (
            "fedjaxsim.robust.aggregators",
            "from fedjaxsim.privacy._noise import add_noise",
            "private parts",
        ),
        ("fedjaxsim.robust.aggregators", "from fedjaxsim.privacy import _noise", "private parts"),
        (
            "fedjaxsim.compression.sparsification",
            "from fedjaxsim.robust.aggregators import _rows",
            "private parts",
        ),
        ("fedjaxsim.privacy", "from ..compression._bits import pack", "private parts"),
        (
            "fedjaxsim.data.digits",
            "from fedjaxsim.core.engine import build_round",
            "data never imports",
        ),
        ("fedjaxsim.data.digits", "from fedjaxsim.algorithms import fed_avg", "data never imports"),
    ],
)
def test_the_checker_reports_each_broken_rule(module, source, expected):
    known = set(MODULES) | {"fedjaxsim.privacy._noise", "fedjaxsim.compression._bits"}
    is_package = module == "fedjaxsim.privacy"
    found = check_source(source, module, is_package=is_package, known=known)
    assert any(expected in message for message in found), found


@pytest.mark.parametrize(
    "module, source",
    [
        (
            "fedjaxsim.core.engine.round",
            "from fedjaxsim.core.trees import tree_add\nfrom . import chunks",
        ),
        ("fedjaxsim.core.losses", "import jax, optax, numpy"),
        ("fedjaxsim.algorithms.personalization", "from fedjaxsim.core.packing import TEST_FLAG"),
        (
            "fedjaxsim.algorithms.scaffold",
            "from fedjaxsim.algorithms.fed_avg import fed_avg\nfrom fedjaxsim.core.engine import build_round",
        ),
        ("fedjaxsim.models.zoo", "from fedjaxsim.core.losses import classification_loss"),
        (
            "fedjaxsim.robust.attacks",
            "from fedjaxsim.privacy.dp import dp_fed_avg_aggregator",
        ),
        ("fedjaxsim.privacy.dp", "from fedjaxsim.privacy._internal import helper"),
        (
            "fedjaxsim.runner.experiment",
            "import fedjaxsim\nfrom fedjaxsim.data import digits\nprint(1)",
        ),
        ("fedjaxsim.data.emnist", "import h5py\nfrom fedjaxsim.core.packing import pack_cohort"),
    ],
)
def test_the_checker_allows_what_the_layers_allow(module, source):
    assert check_source(source, module) == []
