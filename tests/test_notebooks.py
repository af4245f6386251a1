"""Every notebook runs, and every committed notebook is stripped (STYLE §6).

Outputs are never committed (d2l.ai / QuantEcon practice): a notebook's
outputs are only real if CI just produced them.  So each test executes a
notebook from top to bottom in a fresh ``python3`` kernel with nbclient,
fails on the first cell that raises, and separately checks that the file on
disk has no outputs and no execution counts (``nbstripout`` makes it so).

The kernel is the ``python3`` kernelspec; jupyter_client starts it with the
interpreter that runs the tests (``sys.executable``), so it sees the same
venv.  These are plain sync tests: nbclient runs its own event loop, which
must not be nested inside pytest-trio's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def ids(path: Path) -> str:
    return path.stem


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_notebook_is_stripped(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert not dirty, f"cells {dirty} have outputs: run .venv/bin/nbstripout {path.relative_to(ROOT)}"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


def run_notebook(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=120,
        resources={"metadata": {"path": str(path.parent)}},  # cwd of the kernel
    )
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    errors = [
        out
        for cell in nb.cells
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
        or (out.get("name") == "stderr" and "Traceback" in out.get("text", ""))
    ]
    assert not errors, errors


# One test class per notebook, ``TestNotebook_05_grpc::test_runs``: make
# test's workers (pytest-xdist ``--dist loadscope``) take every other file
# whole, so module fixtures start once, but each class on its own, so the
# notebooks, together the longest file, spread over the workers.  (pytest 9
# ignores the node ids that ``--dist loadgroup`` rewrites: with xdist 3.8 it
# sent a group's tests to every worker.)
for _path in NOTEBOOKS:
    _name = "TestNotebook_" + "".join(c if c.isalnum() else "_" for c in _path.stem)
    globals()[_name] = type(_name, (), {"test_runs": lambda self, path=_path: run_notebook(path)})


def test_kernel_is_this_interpreter() -> None:
    """The python3 kernelspec resolves to the venv running the tests."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    manager = KernelManager(kernel_name="python3")
    cmd = manager.format_kernel_cmd()
    assert cmd[0] == sys.executable or Path(cmd[0]).resolve() == Path(sys.executable).resolve(), (
        spec.argv,
        cmd,
    )
