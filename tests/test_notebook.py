"""notebooks/walkthrough.ipynb runs top to bottom on CPU (tiny sizes), executed with nbclient in
a python3 kernel that is this interpreter."""
import json
import os
import sys
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "walkthrough.ipynb"


@pytest.fixture
def this_interpreter_kernel(tmp_path, monkeypatch):
    """A 'python3' kernelspec that starts this very interpreter (not whatever python3 is first on
    PATH or registered system-wide), found first through JUPYTER_PATH."""
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (deepwish tests)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("DEEPWISH_WALKTHROUGH_SIZE", "tiny")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # toy sizes: one thread is fastest, more only wait on each other
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return "python3"


def test_walkthrough_runs_top_to_bottom_on_cpu(this_interpreter_kernel):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.cells[1].metadata.get("tags") == ["parameters"] and "SIZE =" in nb.cells[1].source
    client = nbclient.NotebookClient(nb, kernel_name=this_interpreter_kernel, timeout=240,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                     if o.get("output_type") == "stream")
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert f"deepwish from {ROOT / 'deepwish'}" in text  # this checkout, in this interpreter
    assert "tiny HF Qwen3 -> load_hf" in text and "speculative:" in text
    assert "captured:    needs CUDA" in text
    assert "bit-exact: True (returned in fp32: none); max |logit difference| = 0.00e+00" in text  # save_hf round trip
    summary = json.loads(text[text.rindex('{\n "size"'):])
    assert summary["size"] == "tiny" and summary["final_train_loss"] < summary["first_train_loss"] - 0.2
    assert set(summary["generate_ms_per_token"]) == {"eager", "speculative"}
    # the function a CUDA graph captures, run eagerly, equals the eager step bit for bit
    assert summary["eager_repeatable"] is True and summary["captured_vs_eager_max_logit_diff"] == 0
    assert all(isinstance(summary["kernel_ms"][f"{k} torch"], float)
               for k in ("short_conv", "chunk_gated_delta", "recurrent_step"))
    assert "torch" in summary["model_fwd_bwd_ms"]
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for c in nb.cells for o in c.get("outputs", []))


def test_run_notebook_script_saves_outputs(tmp_path):
    """scripts/run_notebook.py (machines without Jupyter): streams, images and the first error."""
    import subprocess
    png = tmp_path / "dot.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# t"),
                nbformat.v4.new_code_cell("x = 20 + 1\nprint('x is', x)"),
                nbformat.v4.new_code_cell(f"from IPython.display import Image, display\n"
                                          f"display(Image(filename={str(png)!r}))\nprint(x * 2)"),
                nbformat.v4.new_code_cell("raise ValueError('stop here')"),
                nbformat.v4.new_code_cell("print('never')")]
    src, out = tmp_path / "n.ipynb", tmp_path / "done.ipynb"
    nbformat.write(nb, src)
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_notebook.py"), str(src), "--out", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "x is 21" in r.stdout
    done = nbformat.read(out, as_version=4)  # a valid notebook
    nbformat.validate(done)
    c1, c2, c3, c4 = done.cells[1:]
    assert c1.outputs[0]["text"] == "x is 21\n" and c1.execution_count == 1
    assert c2.outputs[0]["text"] == "42\n" and c2.outputs[1]["output_type"] == "display_data"
    assert c2.outputs[1]["data"]["image/png"] == "iVBORw0KGgpmYWtl"
    assert c3.outputs[-1]["output_type"] == "error" and c3.outputs[-1]["ename"] == "ValueError"
    assert c4.outputs == []


def test_run_notebook_without_ipython_draws_figures(tmp_path):
    """Where IPython is not installed the runner's stand-in module must satisfy matplotlib, which
    inspects any loaded "IPython" module whenever a figure is created."""
    import subprocess
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\n"
                                          "ax.plot([1, 2])\nfig.savefig('p.png')\nprint('drawn')")]
    src, out = tmp_path / "n.ipynb", tmp_path / "done.ipynb"
    nbformat.write(nb, src)
    hide_ipython = ("import sys, runpy; sys.modules['IPython'] = None; "
                    f"sys.argv = ['run_notebook.py', {str(src)!r}, '--out', {str(out)!r}]; "
                    f"runpy.run_path({str(ROOT / 'scripts' / 'run_notebook.py')!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", hide_ipython], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "drawn" in r.stdout and (tmp_path / "p.png").stat().st_size > 0
