"""The analyst notebooks: committed without outputs, in sync with their generator, and runnable.

The execution test starts Jupyter kernels with this interpreter (the project's virtual
environment) through a kernel spec written to a temporary folder, so it needs no kernel
registered on the machine and works on a fresh clone.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

FOLDER = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = [
    "01_start_here.ipynb",
    "02_triage_a_finding.ipynb",
    "03_tune_detectors.ipynb",
    "04_hunt.ipynb",
]
KERNEL = "keytrail-test-python"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_notebooks", FOLDER / "build_notebooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebooks_listed() -> None:
    assert sorted(path.name for path in FOLDER.glob("*.ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_notebook_has_no_outputs(name: str) -> None:
    notebook = nbformat.read(FOLDER / name, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]

    assert code, name
    assert [cell.outputs for cell in code] == [[] for _ in code]
    assert [cell.execution_count for cell in code] == [None for _ in code]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_matches_generator(name: str) -> None:
    generator = load_generator()
    expected = generator.build(name, generator.NOTEBOOKS[name])

    committed = nbformat.read(FOLDER / name, as_version=4)

    assert committed == expected, f"run notebooks/build_notebooks.py to rewrite {name}"


def kernel_manager(kernels: Path) -> AsyncKernelManager:
    """Return a manager for a kernel that runs ipykernel with this interpreter."""
    folder = kernels / KERNEL
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "keytrail tests",
        "language": "python",
    }
    (folder / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    specs = KernelSpecManager(kernel_dirs=[str(kernels)])
    return AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


async def execute(path: Path, kernels: Path) -> str | None:
    """Run every cell of ``path``; return the error of the first failing cell, or None."""
    notebook = nbformat.read(path, as_version=4)
    manager = kernel_manager(kernels)
    client = NotebookClient(
        notebook,
        km=manager,
        timeout=240,
        resources={"metadata": {"path": str(FOLDER)}},
    )
    try:
        await client.async_execute()
    except CellExecutionError as exc:
        return f"{path.name}: {exc}"
    finally:
        # nbclient leaves a kernel manager it was given running, with its channels open.
        if client.kc is not None:
            client.kc.stop_channels()
        if manager.has_kernel:
            await manager.shutdown_kernel(now=True)
    return None


async def execute_all(kernels: Path) -> list[str]:
    # The notebooks run at the same time, each in its own kernel, to keep the test short.
    results = await asyncio.gather(*(execute(FOLDER / name, kernels) for name in NAMES))
    return [error for error in results if error is not None]


def test_notebooks_execute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernels inherit TMPDIR, so the notebooks' temporary state lands under tmp_path.
    monkeypatch.setenv("TMPDIR", str(tmp_path))

    errors = asyncio.run(execute_all(tmp_path / "kernels"))

    assert errors == []
