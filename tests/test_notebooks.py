"""Every notebook executes top to bottom on CPU, offline, shows its plots inline, removes what it wrote, and is
committed without (stale) outputs; its first cell installs trainer_guard from a source that exists."""

import os
import re
import subprocess
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _code(path):
    return [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    stale = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not stale, f"{path.name}: clear the outputs of cells {stale} before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_plots_are_not_sent_to_a_non_interactive_backend_nor_warnings_silenced(path):
    source = "\n".join(_code(path))
    assert 'matplotlib.use("Agg")' not in source and "matplotlib.use('Agg')" not in source
    assert 'filterwarnings("ignore")' not in source and "set_verbosity_error" not in source
    assert "tempfile.mkdtemp()" not in source, "write under the notebook's WORK directory, which the last cell removes"


def _run_install_cell(source, cwd, monkeypatch):
    """Execute an install cell as if trainer_guard were missing; return the pip commands it ran."""
    import importlib.util

    real_find_spec, calls = importlib.util.find_spec, []
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "trainer_guard" else real_find_spec(name, *a))
    monkeypatch.setattr(subprocess, "check_call", lambda argv, **kw: calls.append(argv[1:]) or 0)
    monkeypatch.chdir(cwd)
    exec(compile(source, "install-cell", "exec"), {})
    return calls


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_first_cell_installs_from_a_source_that_exists(path, tmp_path, monkeypatch, capsys):
    """Never the bare name (not on PyPI: whoever registers it would be installed): the clone the notebook sits in,
    else the repository URL the reader is told to set."""
    cell = _code(path)[0]
    assert not re.search(r"pip install (-\S+ )*[\"']?trainer[_-]guard\b(?![/\w])", cell)
    assert 'REPO_URL = "https://github.com/<your-org>/trainer_guard"' in cell and "SET REPO_URL" in cell
    # locally from a clone (Jupyter runs a notebook in its own folder): the clone is installed
    assert _run_install_cell(cell, ROOT / "notebooks", monkeypatch) == [
        ["-m", "pip", "install", "-q", str(ROOT), "matplotlib"]]
    # elsewhere (Colab's /content) with the placeholder left: a message saying what to set, nothing installed
    with pytest.raises(RuntimeError, match="set REPO_URL"):
        _run_install_cell(cell, tmp_path, monkeypatch)
    # with REPO_URL set: installed from the repository
    set_url = cell.replace('REPO_URL = "https://github.com/<your-org>/', 'REPO_URL = "https://github.com/example-org/')
    assert _run_install_cell(set_url, tmp_path, monkeypatch) == [
        ["-m", "pip", "install", "-q", "git+https://github.com/example-org/trainer_guard", "matplotlib"]]
    assert "trainer_guard 0." in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's own inline backend, as in Jupyter and Colab
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    if any("plt.show()" in c.source for c in nb.cells if c.cell_type == "code"):
        images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
                  if o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})]
        assert images, f"{path.name}: plt.show() displayed no image"
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "non-interactive" not in text, text  # matplotlib's "FigureCanvasAgg is non-interactive" warning
    # what the notebook wrote, not torch's own compile cache (torchinductor_<user>, shared by every torch program)
    left = sorted(p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_"))
    assert left == [], f"{path.name} left temporary files behind: {left}"
    assert not [p for p in path.parent.iterdir() if p.suffix != ".ipynb"], "the notebook wrote into notebooks/"
