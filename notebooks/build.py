"""Write (and with ``--execute`` run) the notebooks from the cell sources in ``notebooks/cells/``.

The notebooks are generated so their source stays reviewable as plain Python: each
``notebooks/cells/NN_name.py`` holds one notebook as a list of cells, separated by marker lines::

    # %% [markdown]      a Markdown cell (the lines below it, with the leading "# " removed)
    # %% parameters      the code cell tagged ``parameters`` (the sizes; the tests shrink them)
    # %%                 an ordinary code cell

Usage (from the repository root)::

    python notebooks/build.py                 # write every notebook, without outputs
    python notebooks/build.py --execute       # write and execute at normal sizes, storing outputs
    python notebooks/build.py 03_rnn_scan --execute

Execution uses ``nbclient`` with the ``python3`` kernel, the repository root as the working
directory and on ``PYTHONPATH``, so ``import jaxllm`` works without installing the package.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent
ROOT = NOTEBOOKS.parent
CELLS = NOTEBOOKS / "cells"
MARKERS = ("# %% [markdown]", "# %% parameters", "# %%")


def parse_cells(text: str) -> list[tuple[str, str]]:
    """``[(kind, source)]`` with kind ``markdown``, ``parameters`` or ``code``, from a cells file."""
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        stripped = line.rstrip()
        if stripped in MARKERS:
            kind = {"# %% [markdown]": "markdown", "# %% parameters": "parameters"}.get(stripped, "code")
            cells.append((kind, []))
        elif not cells:
            if stripped:  # text before the first marker (the file's own docstring) is not a cell
                continue
        else:
            cells[-1][1].append(line)
    out = []
    for kind, lines in cells:
        if kind == "markdown":
            lines = [ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in lines]
        source = "\n".join(lines).strip("\n")
        if source.strip():
            out.append((kind, source))
    return out


def make_notebook(name: str):
    """The notebook ``name`` (e.g. ``01_five_steps``) as an ``nbformat`` node, without outputs."""
    import nbformat

    cells = []
    for i, (kind, source) in enumerate(parse_cells((CELLS / f"{name}.py").read_text())):
        if kind == "markdown":
            cell = nbformat.v4.new_markdown_cell(source)
        else:
            cell = nbformat.v4.new_code_cell(source)
            if kind == "parameters":
                cell.metadata["tags"] = ["parameters"]
        cell.id = f"{name[:2]}-{i:02d}"  # stable ids keep rebuilt notebooks' diffs small
        cells.append(cell)
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def _client(nb, cwd: Path, timeout: int):
    from nbclient import NotebookClient

    return NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                          resources={"metadata": {"path": str(cwd)}})


def _kernel_env() -> dict[str, str]:
    """The kernel's environment: ours, with the repository root and the notebooks' own helpers
    (``notebooks/notebook_utils.py``) first on ``PYTHONPATH``."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "notebooks"), *([path] if path else [])])}


def execute(nb, *, cwd: Path = ROOT, timeout: int = 1200):
    """Run ``nb`` top to bottom in a fresh ``python3`` kernel (raises on the first cell error)."""
    _client(nb, cwd, timeout).execute(env=_kernel_env())
    return nb


async def execute_async(nb, *, cwd: Path = ROOT, timeout: int = 1200):
    """``execute`` as a coroutine, so several notebooks (each in its own kernel) can run at once."""
    await _client(nb, cwd, timeout).async_execute(env=_kernel_env())
    return nb


def main(argv=None) -> None:
    import nbformat

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="notebooks to build (default: every notebooks/cells/*.py)")
    parser.add_argument("--execute", action="store_true", help="run each notebook and store its outputs")
    args = parser.parse_args(argv)
    names = args.names or sorted(p.stem for p in CELLS.glob("[0-9][0-9]_*.py"))
    for name in names:
        if not (CELLS / f"{name}.py").is_file():
            sys.exit(f"no cells file {CELLS / (name + '.py')}")
        nb = make_notebook(name)
        if args.execute:
            start = time.perf_counter()
            execute(nb)  # one at a time: the stored timing tables must not compete with each other
            print(f"{name}: executed in {time.perf_counter() - start:.0f} s")
        nbformat.validate(nb)
        nbformat.write(nb, NOTEBOOKS / f"{name}.ipynb")
        print(f"wrote notebooks/{name}.ipynb")


if __name__ == "__main__":
    main()
