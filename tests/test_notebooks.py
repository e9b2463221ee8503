"""The notebooks: every ``notebooks/*.ipynb`` runs top to bottom, on a copy in a temporary
directory, with the small sizes its ``parameters`` cell declares (``NAME = normal  # test: small``);
a cell error fails the test and the stored notebook is never written. The stored notebooks carry
the outputs of a full run, match their sources in ``notebooks/cells/`` and are listed in
``notebooks/README.md``. Also the notebooks' small helpers, ``notebooks/notebook_utils.py``."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
sys.path.insert(0, str(NOTEBOOK_DIR))  # the notebooks' own helpers, as their kernels import them
from notebook_utils import overlay_losses, time_calls, timing_table  # noqa: E402
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
SMOKE_LINE = re.compile(r"^(?P<name>[A-Za-z_]\w*)\s*=\s*(?P<normal>.+?)\s*#\s*test:\s*(?P<small>.+?)\s*$")


def load_build():
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOK_DIR / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parameters_cell(nb):
    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one code cell tagged 'parameters', found {len(cells)}"
    assert cells[0] is next(c for c in nb.cells if c.cell_type == "code"), "the parameters cell must be the first code cell"
    return cells[0]


def smoke_source(source: str) -> str:
    """Every ``NAME = normal  # test: small`` line becomes ``NAME = small``; other lines stay."""
    lines = []
    for line in source.splitlines():
        m = SMOKE_LINE.match(line)
        lines.append(f"{m['name']} = {m['small']}" if m else line)
    return "\n".join(lines)


def png_outputs(nb) -> int:
    return sum("image/png" in out.get("data", {}) for c in nb.cells if c.cell_type == "code" for out in c.outputs)


def test_there_are_notebooks():
    assert {p.stem for p in NOTEBOOKS} >= {"01_five_steps", "02_logistic_mlp_cnn", "03_rnn_scan",
                                           "04_transformer_kv_cache"}


def test_smoke_source_rewrites_only_marked_lines():
    source = "# sizes\nSTEPS = 300  # test: 3\nLR = 1e-3\nSIZES = (8, 16)   #  test: (2, 4)\nNOTE = 1  # a comment"
    assert smoke_source(source) == "# sizes\nSTEPS = 3\nLR = 1e-3\nSIZES = (2, 4)\nNOTE = 1  # a comment"


# notebooks run at once, each in its own kernel (XLA compiles on one core per kernel); under
# pytest-xdist the other cores already run other workers
SMOKE_KERNELS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory) -> dict[str, dict]:
    """Execute a small-size copy of every notebook, ``SMOKE_KERNELS`` at a time.

    Returns ``{stem: {"copy": executed nb, "error": exception or None, "stored": bytes before}}``.
    """
    import asyncio

    import nbformat

    build = load_build()
    runs = {}
    for path in NOTEBOOKS:
        stored = path.read_bytes()
        nb = nbformat.reads(stored.decode("utf-8"), as_version=4)
        cell = parameters_cell(nb)
        small = smoke_source(cell.source)
        assert small != cell.source, f"{path.name}: its parameters cell declares no '# test:' sizes"
        cell.source = small
        for c in nb.cells:
            if c.cell_type == "code":
                c.outputs, c.execution_count = [], None
        workdir = tmp_path_factory.mktemp(path.stem)
        nbformat.write(nb, workdir / path.name)  # the copy; the stored notebook is only read
        runs[path.stem] = {"copy": nb, "workdir": workdir, "stored": stored, "error": None}

    async def run_all():
        gate = asyncio.Semaphore(SMOKE_KERNELS)

        async def run(stem, run):
            async with gate:
                try:
                    await build.execute_async(run["copy"], cwd=run["workdir"], timeout=300)
                except Exception as err:  # reported by that notebook's test
                    run["error"] = err

        # later notebooks are the bigger ones: starting them first shortens the total
        await asyncio.gather(*(run(stem, runs[stem]) for stem in sorted(runs, reverse=True)))

    asyncio.run(run_all())
    for stem, run in runs.items():
        nbformat.write(run["copy"], run["workdir"] / f"{stem}.ipynb")
    return runs


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_a_copy_with_small_sizes(path, smoke_runs):
    run = smoke_runs[path.stem]
    if run["error"] is not None:  # nbclient's CellExecutionError names the cell and its traceback
        pytest.fail(f"{path.name} failed at small sizes:\n{run['error']}", pytrace=False)
    assert path.read_bytes() == run["stored"], "the stored notebook must not be touched"
    assert png_outputs(run["copy"]) >= 1, "the notebook must draw the overlaid loss curves"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_notebook_is_a_full_run_of_its_source(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), \
        "stored outputs must come from one top-to-bottom run"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"stored notebook holds errors: {[e.ename for e in errors]}"
    assert png_outputs(nb) >= 1
    assert "# test:" in parameters_cell(nb).source

    if not (NOTEBOOK_DIR / "cells" / f"{path.stem}.py").is_file():
        return  # a notebook kept as .ipynb only: nothing to compare with
    source = load_build().make_notebook(path.stem)
    assert [(c.cell_type, c.source) for c in nb.cells] == [(c.cell_type, c.source) for c in source.cells], \
        f"{path.name} differs from notebooks/cells/{path.stem}.py: run python notebooks/build.py {path.stem} --execute"


def test_readme_lists_every_notebook():
    readme = (NOTEBOOK_DIR / "README.md").read_text()
    missing = [p.name for p in NOTEBOOKS if p.name not in readme]
    assert not missing, f"notebooks/README.md does not link {missing}"


# ----------------------------------------------------------------------------- notebook_utils


def test_timing_table_reports_first_call_and_steady_median():
    table = timing_table({"eager": [0.004, 0.002, 0.003, 0.001], "jit": [0.5, 0.001, 0.0006]})
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    eager, jit = ([cell.strip() for cell in row] for row in rows)
    # eager: first 4 ms, median of (2, 3, 1) ms = 2 ms; jit: first 500 ms, median of (1, 0.6) = 0.8 ms
    assert eager == ["eager", "4", "4", "2", "2.0x", "1.00x"]
    assert jit == ["jit", "3", "500", "0.8", "625.0x", "0.40x"]
    assert table._repr_markdown_() == str(table)


def test_timing_table_refuses_too_few_calls():
    with pytest.raises(ValueError, match="at least 2 timed calls"):
        timing_table({"one call": [0.1]})
    with pytest.raises(ValueError, match="unit"):
        timing_table({"x": [0.1, 0.2]}, unit="h")


def test_time_calls_counts_every_call():
    calls = []
    times = time_calls(lambda v: calls.append(v) or np.ones(3), 7, calls=3)
    assert calls == [7, 7, 7] and len(times) == 3 and all(t >= 0 for t in times)
    with pytest.raises(ValueError, match="calls must be >= 2"):
        time_calls(lambda: None, calls=1)


def test_overlay_losses_draws_every_curve_and_their_gaps():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = [3.0, 2.0, 1.0]
    fig = overlay_losses({"torch": a, "jax": [3.0, 2.0 + 1e-6, 1.0], "nnx": a})
    curves, gaps = fig.axes
    assert [line.get_label() for line in curves.get_lines()] == ["torch", "jax", "nnx"]
    drawn = [line.get_ydata() for line in gaps.get_lines()]
    np.testing.assert_allclose(drawn[0], [np.nan, 1e-6, np.nan], rtol=1e-3)  # zero gaps are left out
    assert np.all(np.isnan(drawn[1]))
    plt.close(fig)
    with pytest.raises(ValueError, match="one length"):
        overlay_losses({"a": [1.0, 2.0], "b": [1.0]})


def test_play_tokens_refuses_an_unknown_play():
    from notebook_utils import play_tokens

    with pytest.raises(ValueError, match="unknown play 'hamlett'"):
        play_tokens("hamlett")
