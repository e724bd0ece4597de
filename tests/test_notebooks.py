"""Every notebook runs top to bottom with small parameters, and is stored without outputs.

Parameters are injected papermill-style: the cell tagged ``parameters`` keeps its defaults and a
new cell right after it (tagged ``injected-parameters``) overrides them with the tiny values below.
The notebooks run in the ``python3`` kernel, which jupyter_client starts with this interpreter
(the virtual environment's), in an empty temporary working directory (a notebook must not depend on
being started from ``notebooks/``). Any error fails the test.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
ALL = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
MAX_CODE_LINES = 25  # notebooks call the library; no long code in cells

# tiny values: the three notebooks together stay well under a minute and a half on two cores
SMALL = {
    "01_cluster_formation.ipynb": dict(n=10, d=3, steps=12, dt=0.2, anim_frames=3),
    "02_theory.ipynb": dict(quick=True),
    "03_trained_vs_simulated.ipynb": dict(quick=True, n_inputs=2, seq_len=8),
}


def _tiny_hf_model(path: Path):
    """A randomly initialised 2-layer GPT-2 (16 dims) with a word-level tokenizer, saved with
    save_pretrained, for 03's optional Hugging Face cell; None when transformers is not installed."""
    try:
        import torch
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import GPT2Config, GPT2Model, PreTrainedTokenizerFast
    except ImportError:
        return None
    words = "tokens are particles and attention layers move them".split()
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(path)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(vocab), n_embd=16, n_layer=2, n_head=2, n_positions=32,
                        bos_token_id=None, eos_token_id=None)
    GPT2Model(config).save_pretrained(path)
    return str(path)


def _strip_module():
    spec = importlib.util.spec_from_file_location("strip_notebooks", ROOT / "scripts" / "strip_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inject(nb, params: dict):
    """Insert a cell assigning `params` after the cell tagged "parameters" (papermill convention)."""
    where = next((i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])),
                 None)
    if where is None:
        raise AssertionError("the notebook has no cell tagged 'parameters'")
    source = "# injected parameters\n" + "".join(f"{k} = {v!r}\n" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(where + 1, cell)
    return nb


def test_expected_notebooks_exist():
    assert ALL == sorted(SMALL), f"notebooks/: {ALL}"


@pytest.mark.parametrize("name", ALL)
def test_notebook_stripped_and_short(name):
    path = NOTEBOOKS / name
    assert _strip_module().is_stripped(path), f"{name} has outputs: run `python scripts/strip_notebooks.py`"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert len(cell.source.splitlines()) <= MAX_CODE_LINES, f"{name}: long cell\n{cell.source}"


@pytest.mark.parametrize("name", ALL)
def test_notebook_runs(name, tmp_path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    params = dict(SMALL.get(name, {}), out_dir=str(tmp_path))
    if name.startswith("03_"):
        params["hf_model_dir"] = _tiny_hf_model(tmp_path / "tiny-gpt2")
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    inject(nb, {k: v for k, v in params.items() if f"{k} =" in source})
    client = NotebookClient(nb, timeout=180, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    # the notebook on disk is left untouched (still without outputs)
    assert _strip_module().is_stripped(NOTEBOOKS / name)
    if name.startswith("01_"):
        texts = json.dumps([o for c in nb.cells for o in c.get("outputs", [])])
        assert "application/vnd.jupyter.widget-view+json" in texts  # the panel was displayed
        assert "wrote" in texts or "skipped" in texts  # the animation cell ran
    if name.startswith("03_"):  # the shipped checkpoints were found from the temporary directory
        texts = json.dumps([o for c in nb.cells for o in c.get("outputs", [])])
        assert "; models: " in texts and "models: none" not in texts and "task: None" not in texts
        assert "ablations" not in texts  # only real checkpoint cards are listed (not ablations.json)
    if name.startswith("03_") and params["hf_model_dir"]:
        assert "GPT2Model" in texts  # the optional Hugging Face comparison ran


def test_panel_redraws_on_widget_change():
    """The panel of notebook 01 without a browser: picking another model changes the image."""
    pytest.importorskip("ipywidgets")
    import matplotlib

    matplotlib.use("Agg")
    from analysis import explore

    ui = explore.panel("krause", n=8, steps=10, dt=0.2)
    first = ui.image.value
    assert first[:8] == b"\x89PNG\r\n\x1a\n"
    ui.controls["model"].value = "sa"
    assert ui.image.value != first and ui.dataset().attrs["model"] == "sa"
    ui.controls["model"].value = "hk"  # needs a radius: the panel sets one
    assert ui.controls["radius"].value > 0 and ui.dataset().attrs["model"] == "hk"


def test_panel_controls_come_from_the_parameter_table(monkeypatch):
    """The panel and model_params read particles.params.PARAMS (widget kind, label with the presets
    a parameter applies to, tooltip, which parameters a model takes) instead of spelling them out."""
    pytest.importorskip("ipywidgets")
    import dataclasses

    import matplotlib

    matplotlib.use("Agg")
    from analysis import explore
    from particles.params import PARAMS

    assert set(explore.PANEL) <= set(PARAMS)
    beta = dataclasses.replace(PARAMS["beta"], models=("sa", "usa", "krause"), help="the new help")
    monkeypatch.setitem(PARAMS, "beta", beta)
    ui = explore.panel("krause", n=8, steps=10, dt=0.2)
    c = ui.controls
    assert c["beta"].description == "β (sa/usa/krause)" and c["beta"].tooltip == "the new help"
    assert c["sigma"].description == "σ (krause)" and c["top_k"].description == "top_k (0=off)"
    assert type(c["causal"]).__name__ == "Checkbox" and type(c["n"]).__name__ == "IntSlider"
    assert ui.dataset().attrs["beta"] == 4.0  # beta now applies to krause: the panel's run passed it
    assert explore.model_params("krause", beta=2, sigma=0.5, radius=0, top_k=3, causal=False) == dict(
        beta=2.0, sigma=0.5, top_k=3)
    with pytest.raises(TypeError, match="unknown model parameter"):
        explore.model_params("sa", steps=3)


def test_export_animation(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from analysis import explore

    ds = explore.run("sa", n=6, d=3, steps=4, dt=0.2)
    out = explore.export_animation(ds, tmp_path / "a.gif", max_frames=3)
    if out is not None:
        assert out.read_bytes()[:3] == b"GIF"
    with pytest.raises(ValueError, match="path"):
        explore.export_animation(ds, tmp_path / "a.avi")
