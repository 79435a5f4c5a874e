"""File-format libraries stay inside fedjaxsim/data, and load only when used."""

import ast
import subprocess
import sys
from pathlib import Path

import fedjaxsim

FORMAT_LIBRARIES = {
    "h5py",
    "sqlite3",
    "tensorflow_datasets",
    "tensorflow",
    "msgpack",
    "array_record",
}
PACKAGE = Path(fedjaxsim.__file__).parent


def _imported_roots(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


def test_only_the_data_package_imports_file_format_libraries():
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(set(_imported_roots(path)) & FORMAT_LIBRARIES)
        for path in PACKAGE.rglob("*.py")
        if "data" not in path.relative_to(PACKAGE).parts[:1]
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_the_data_package_loads_no_optional_dependency():
    code = (
        "import sys, fedjaxsim.data; "
        "print(sorted(m for m in ('h5py', 'tensorflow_datasets', 'tensorflow') "
        "if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
