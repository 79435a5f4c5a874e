"""The tutorial notebooks in docs/tutorials/ run top to bottom and are stored stripped.

Each notebook executes in a fresh ``python3`` kernel (this interpreter) in a
temporary working folder, with ``MPLBACKEND=Agg``. A failing cell fails its
test with the cell's traceback. The notebooks carry their own assert cells
(reloaded predictions equal the in-memory ones, hand-built algorithms equal
the built-in ones, the accountant matches the runner), so a notebook that runs
but computes the wrong thing fails too.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

TUTORIALS = Path(__file__).resolve().parents[2] / "docs" / "tutorials"
KERNEL = "python3"
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # IPython colours its tracebacks
CELL_TIMEOUT_S = 300  # one cell; the three notebooks together take well under 90 s on 2 CPU cores

# Every notebook in docs/tutorials/ must be listed here (checked below), so a
# new notebook cannot be added without being executed by the suite.
NOTEBOOKS = (
    "federated_image_classification.ipynb",
    "write_your_own_algorithm.ipynb",
    "privacy.ipynb",
)


def _runs_this_interpreter(argv: list[str]) -> bool:
    # jupyter_client replaces a bare "python"/"python3" by sys.executable.
    bare = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}
    return bool(argv) and (argv[0] in bare or Path(argv[0]) == Path(sys.executable))


@pytest.fixture(scope="session")
def kernel_environment(tmp_path_factory):
    """Environment for the kernel: the ``python3`` spec must start this interpreter.

    ipykernel installs that spec into the venv (``share/jupyter/kernels``).
    When it is missing, or a user-level spec of the same name points at another
    Python, one is written into a temporary ``JUPYTER_PATH`` instead, which
    takes precedence; global Jupyter state is never touched.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MPLBACKEND", "Agg")
        try:
            spec = KernelSpecManager().get_kernel_spec(KERNEL)
            usable = _runs_this_interpreter(spec.argv)
        except NoSuchKernel:
            usable = False
        if not usable:
            from ipykernel.kernelspec import write_kernel_spec

            jupyter_path = tmp_path_factory.mktemp("jupyter")
            write_kernel_spec(jupyter_path / "kernels" / KERNEL)
            patch.setenv("JUPYTER_PATH", str(jupyter_path))
            spec = KernelSpecManager().get_kernel_spec(KERNEL)
            assert _runs_this_interpreter(spec.argv), spec.argv
        yield


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(TUTORIALS / name, as_version=4)


def test_every_tutorial_notebook_is_executed_here():
    on_disk = sorted(path.name for path in TUTORIALS.glob("*.ipynb"))
    assert on_disk == sorted(NOTEBOOKS), (
        "docs/tutorials/ and NOTEBOOKS in tests/docs/test_notebooks.py differ: "
        f"add new notebooks to NOTEBOOKS (on disk: {on_disk})"
    )


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_stripped(name):
    notebook = _read(name)
    nbformat.validate(notebook)
    assert "widgets" not in notebook.metadata, f"{name}: widget state is stored"
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        where = f"{name}, cell {index}"
        assert cell.outputs == [], f"{where} has stored outputs: strip them"
        assert cell.execution_count is None, f"{where} has an execution count: strip it"
        assert cell.source.strip(), f"{where} is an empty code cell"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, kernel_environment, tmp_path):
    notebook = _read(name)
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        startup_timeout=120,
        kernel_name=KERNEL,
        # The kernel's working folder: nothing a notebook writes lands in the repo.
        resources={"metadata": {"path": str(tmp_path)}},
    )
    start = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as error:
        message = ANSI_ESCAPE.sub("", str(error))
        pytest.fail(f"{name} failed after {time.perf_counter() - start:.1f} s:\n{message}", False)
    assert not list(tmp_path.iterdir()), f"{name} left files in its working folder"
