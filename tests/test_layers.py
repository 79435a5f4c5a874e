"""The functional core stays pure: no I/O libraries, no printing, no host syncs."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fedjaxsim"
BANNED_MODULES = {"tensorflow", "tensorflow_datasets", "orbax", "h5py", "sqlite3", "logging",
                  "tqdm", "matplotlib", "tensorboardX", "pickle"}
BANNED_CALLS = {"print", "device_get"}
PURE_FILES = sorted((PACKAGE / "core").glob("*.py")) + sorted((PACKAGE / "algorithms").glob("*.py"))


@pytest.mark.parametrize("path", PURE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_core_and_algorithms_import_no_io_and_never_print(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            names = []
        for name in names:
            assert name.split(".")[0] not in BANNED_MODULES, f"{path.name} imports {name}"
        if isinstance(node, ast.Call):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            assert called not in BANNED_CALLS, f"{path.name} calls {called} at line {node.lineno}"


def test_the_check_finds_the_pure_files():
    names = {p.name for p in PURE_FILES}
    assert {"engine.py", "packing.py", "fed_avg.py"} <= names
