"""Execute the analyst notebooks and save the README picture of each under docs/analysts/.

Run from the repository root with the project's environment::

    .venv/bin/python notebooks/render_figures.py

Each notebook's cell tagged ``readme-figure`` (see ``build_notebooks.py``) must draw exactly one
PNG picture; it is written to ``docs/analysts/<notebook name>.png``. The notebooks themselves
are not changed, so their committed copies stay without outputs.
"""

from __future__ import annotations

import asyncio
import base64
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

FOLDER = Path(__file__).resolve().parent
TARGET = FOLDER.parent / "docs" / "analysts"
FIGURE_TAG = "readme-figure"


async def render(path: Path) -> Path:
    """Execute ``path`` in a fresh kernel and write the PNG of its tagged cell."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=300,
        resources={"metadata": {"path": str(FOLDER)}},
    )
    await client.async_execute()
    tagged = [cell for cell in notebook.cells if FIGURE_TAG in cell.metadata.get("tags", [])]
    if len(tagged) != 1:
        raise ValueError(f"{path.name}: expected one cell tagged {FIGURE_TAG}, found {len(tagged)}")
    pictures = [
        output["data"]["image/png"]
        for output in tagged[0].get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    if len(pictures) != 1:
        raise ValueError(f"{path.name}: the {FIGURE_TAG} cell drew {len(pictures)} PNG pictures")
    TARGET.mkdir(parents=True, exist_ok=True)
    target = TARGET / f"{path.stem}.png"
    target.write_bytes(base64.b64decode(pictures[0]))
    return target


async def render_all(names: list[str]) -> list[Path]:
    paths = sorted(FOLDER.glob("*.ipynb"))
    if names:
        paths = [path for path in paths if path.stem in names or path.name in names]
    return list(await asyncio.gather(*(render(path) for path in paths)))


def main() -> None:
    for target in asyncio.run(render_all(sys.argv[1:])):
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
