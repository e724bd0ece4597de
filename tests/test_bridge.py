"""Bridge between trained transformers and particle dynamics (issue 7): extraction, simulation, comparison."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import xarray as xr

import analysis
from analysis.bridge import (
    attention_layers,
    compare,
    extract,
    fit_preset,
    format_table,
    layer_metrics,
    load_hf,
    simulate_like,
)
from particles.nn import TASKS, build_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


def _model(task, attention, **overrides):
    torch.manual_seed(0)
    cfg = TASKS[task]().config(attention, **overrides)
    m = build_model(cfg).eval()
    m.config = cfg
    return m


@pytest.fixture(scope="module")
def vit():
    return {a: _model("digits-vit", a, d_model=32, n_layers=3) for a in ("krause", "softmax", "hybrid")}


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1)) * 16


def _manual(model, x):
    """Residual stream and sub-layer outputs written out by hand from the model's modules."""
    with torch.no_grad():
        h = model.embed(x)
        hs, mids, normed = [h], [], []
        for b in model.blocks:
            normed.append(b.norm1(h))
            mid = h + b.attn(b.norm1(h))
            h = mid + b.mlp(b.norm2(mid))
            hs.append(h)
            mids.append(mid)
        return hs, mids, normed + [model.norm(h)]


# --- our models ---------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["krause", "softmax", "hybrid"])
def test_ours_hidden_states_exact(vit, images, attention):
    m = vit[attention]
    ds = extract(m, images)
    hs, _, normed = _manual(m, images)
    assert ds["x"].dims == ("sample", "layer", "token", "component")
    assert ds["x"].shape == (3, 4, 17, 32)
    for layer, h in enumerate(hs):
        np.testing.assert_array_equal(ds["x"].isel(layer=layer).values, h.numpy())
    dn = extract(m, images, representation="normalised", attention=False)
    for layer, h in enumerate(normed):
        np.testing.assert_array_equal(dn["x"].isel(layer=layer).values, h.numpy())
    with torch.no_grad():
        np.testing.assert_array_equal(dn["x"].isel(layer=-1).values, m.hidden(images).numpy())
        np.testing.assert_array_equal(
            m.head(torch.from_numpy(dn["x"].values[:, -1, 0])).numpy(), m(images).numpy()
        )
    assert list(ds["token_label"].values[:2]) == ["CLS", "patch_0_0"]


@pytest.mark.parametrize("attention", ["krause", "softmax", "hybrid"])
def test_ours_attention_rows_and_support(vit, images, attention):
    ds = extract(vit[attention], images)
    a = ds["attention"]
    assert a.dims == ("sample", "layer", "head", "query", "key") and a.shape == (3, 4, 4, 17, 17)
    assert np.isnan(a.isel(layer=-1)).all()
    a = attention_layers(a).values
    np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-6)
    assert (a >= 0).all()
    if attention == "krause":  # grid locality: a patch never sees a non-neighbour patch
        support = vit["krause"].blocks[0].attn.support(17).numpy()
        assert (a[..., ~support] == 0).all()
        top_k = vit["krause"].blocks[0].attn.top_k
        assert ((a[:, 0] > 0).sum(-1) <= top_k).all()
        np.testing.assert_allclose(ds["sigma"].isel(layer=0).values, 2.5)
    if attention == "hybrid":
        assert ds["branch_attention"].dims == ("sample", "branch", "layer", "head", "query", "key")
        assert list(ds["branch"].values) == ["softmax", "krause"]
        g = attention_layers(ds["gate"]).values
        np.testing.assert_allclose(g.sum(-1), 1.0, atol=1e-6)
        b = attention_layers(ds["branch_attention"].transpose("branch", "sample", "layer", ...)).values
        mix = g.transpose(0, 1, 2, 3)[:, :, None, :, :1] * b[0] + g[:, :, None, :, 1:] * b[1]
        np.testing.assert_allclose(mix, a, atol=1e-6)
        assert "gated mixture" in ds.attrs["attention_label"]


def test_causal_masked_entries_zero_and_token_ids():
    m = _model("recall", "krause")
    T, w = m.seq_len, m.blocks[0].attn.window
    x = torch.randint(0, m.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))
    ds = extract(m, x)
    a = attention_layers(ds["attention"]).values
    i, j = np.indices((T, T))
    masked = (j > i) | (i - j >= w)  # causal sliding window
    assert (a[..., masked] == 0).all()
    np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(ds["token_id"].values, x.numpy())
    assert ds.attrs["causal"] == 1 and ds.attrs["window"] == w


def test_reduce_matches_full_metrics(vit, images):
    m = vit["hybrid"]
    full = extract(m, images)
    red = extract(m, images, reduce=True, sink_k=1)
    assert "attention" not in red and "branch_attention" not in red
    a = attention_layers(full["attention"])
    np.testing.assert_allclose(
        attention_layers(red["first_token_mass"]).values, analysis.first_token_mass(a).values, atol=1e-6
    )
    np.testing.assert_allclose(
        attention_layers(red["sink_score"]).values, analysis.sink_scores(a, 1).values, atol=1e-6
    )
    np.testing.assert_allclose(
        attention_layers(red["attention_entropy"]).values, analysis.attention_entropy(a).values, atol=1e-6
    )
    b = attention_layers(full["branch_attention"])
    np.testing.assert_allclose(
        attention_layers(red["branch_first_token_mass"]).values,
        analysis.first_token_mass(b).values,
        atol=1e-6,
    )
    np.testing.assert_array_equal(red["x"].values, full["x"].values)
    with pytest.raises(ValueError, match="reduce"):
        extract(m, images, reduce=["nope"])
    with pytest.raises(ValueError, match="representation"):
        extract(m, images, representation="raw")


# --- simulated counterparts ---------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["krause", "softmax", "hybrid"])
def test_own_attention_reproduces_attention_sublayer(vit, images, attention):
    """One residual step of the model's own attention = the block's attention sub-layer h + attn(norm1(h));
    the block output differs from it exactly by the MLP branch it leaves out."""
    m = vit[attention]
    ds = extract(m, images)
    hs, mids, _ = _manual(m, images)
    for layer in range(len(m.blocks)):
        sim = simulate_like(m, ds["x"].isel(layer=layer), mode="own", geometry="residual", layers=[layer])
        out = torch.from_numpy(sim["x"].isel(layer=1).values)
        torch.testing.assert_close(out, mids[layer], rtol=0, atol=0)
        block = m.blocks[layer]
        with torch.no_grad():
            torch.testing.assert_close(out + block.mlp(block.norm2(out)), hs[layer + 1], rtol=0, atol=0)
        np.testing.assert_allclose(
            sim["attention"].isel(layer=0).values, ds["attention"].isel(layer=layer).values, atol=1e-6
        )


def test_own_sphere_and_presets(vit, images):
    m = vit["krause"]
    ds = extract(m, images)
    own = simulate_like(m, ds, steps_per_layer=2)
    norms = np.linalg.norm(own["x"].values, axis=-1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    assert own["x"].shape == ds["x"].shape
    sa = simulate_like(m, ds, mode="sa", beta=2.0, steps_per_layer=2)
    assert sa["x"].dims == ds["x"].dims and sa["x"].shape == ds["x"].shape
    np.testing.assert_allclose(attention_layers(sa["attention"]).values.sum(-1), 1.0, atol=1e-9)
    kr = simulate_like(m, ds, mode="krause", sigma=0.5)
    a = attention_layers(kr["attention"]).values
    assert ((a > 0).sum(-1) <= 3).all()  # top-k of layer 0 (grid locality has no simulator counterpart)
    with pytest.raises(ValueError, match="mode"):
        simulate_like(m, ds, mode="hk")
    with pytest.raises(ValueError, match="geometry"):
        simulate_like(m, ds, mode="sa", geometry="residual")


def test_fit_preset_recovers_beta():
    """A trajectory simulated with SA(β = 4) is fitted back to β = 4 with ~zero residual."""
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((2, 12, 3))
    target = simulate_like(None, x0, mode="sa", beta=4.0, n_layers=3, steps_per_layer=4, attention=False)
    fit = fit_preset(target, "sa", grid=[0.5, 1.0, 4.0, 16.0], eps=0.3)
    assert fit["value"] == 4.0 and fit["residual"] < 1e-9 and not fit["at_boundary"]
    fit = fit_preset(target, "krause", grid=[0.2, 1.0], eps=0.3)
    assert fit["param"] == "sigma" and len(fit["residuals"]) == 2 and fit["residual"] >= 0


def test_layer_metrics_of_a_simulate_trajectory():
    from particles import simulate

    sim = simulate("sa", n=10, d=3, steps=4, dt=0.5, beta=2.0, return_weights=True)
    m = layer_metrics(sim, eps=0.3)
    assert m["effective_rank"].dims == ("layer",) and m.sizes["layer"] == 5
    np.testing.assert_allclose(m["first_token_mass"].values, sim["attention"].values[:, :, 0].mean(-1))


def test_compare_table(vit, images):
    dss = {a: extract(vit[a], images, reduce=(a == "hybrid")) for a in vit}
    cmp = compare(dss)
    assert cmp["clusters"].dims == ("model", "layer") and list(cmp["model"].values) == list(dss)
    lm = layer_metrics(dss["softmax"])
    np.testing.assert_allclose(cmp["effective_rank"].sel(model="softmax").values, lm["effective_rank"].values)
    assert np.isnan(cmp["first_token_mass"].sel(model="krause", layer=3))
    text = format_table(cmp)
    assert "softmax" in text and "Sink_0^0.3" in text and "[krause branch]" in text


# --- Hugging Face -------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")


def _tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {
        "[PAD]": 0,
        "[UNK]": 1,
        **{w: i + 2 for i, w in enumerate("the cat sat on a mat and dog ran".split())},
    }
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    return fast


def _hf_config(family):
    from transformers import BertConfig, GPT2Config, LlamaConfig

    common = dict(vocab_size=16)
    if family == "bert":
        return BertConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
            **common,
        )
    if family == "gpt2":
        return GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32, **common)
    return LlamaConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        **common,
    )


def _save_hf(family, path):
    from transformers import AutoModel

    torch.manual_seed(0)
    AutoModel.from_config(_hf_config(family)).save_pretrained(path)
    _tokenizer(path).save_pretrained(path)
    return family, path


@pytest.fixture(scope="module", params=["bert", "gpt2", "llama"])
def hf_dir(request, tmp_path_factory):
    return _save_hf(request.param, tmp_path_factory.mktemp(request.param))


def test_hf_extract_matches_output_hidden_states(hf_dir):
    family, path = hf_dir
    model, tok = load_hf(path)
    assert tok is not None
    ids = torch.randint(0, 16, (2, 7), generator=torch.Generator().manual_seed(0))
    ds = extract(model, ids)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, output_attentions=True)
    L, H = 2, model.config.num_attention_heads
    assert ds["x"].shape == (2, L + 1, 7, 16) and ds["attention"].shape == (2, L + 1, H, 7, 7)
    for layer, h in enumerate(out.hidden_states):
        np.testing.assert_array_equal(ds["x"].isel(layer=layer).values, h.numpy())
    for layer, a in enumerate(out.attentions):
        np.testing.assert_array_equal(ds["attention"].isel(layer=layer).values, a.numpy())
    a = attention_layers(ds["attention"]).values
    np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-6)
    if family in ("gpt2", "llama"):
        assert ds.attrs["causal"] == 1
        assert (a[..., np.triu_indices(7, 1)[0], np.triu_indices(7, 1)[1]] == 0).all()
    if family == "llama":
        assert ds.attrs["num_key_value_heads"] == 2 and ds.attrs["n_heads"] == 4 and ds.sizes["head"] == 4
    red = extract(model, ids, reduce=True)
    np.testing.assert_allclose(
        attention_layers(red["attention_entropy"]).values,
        analysis.attention_entropy(attention_layers(ds["attention"])).values,
        atol=1e-6,
    )
    norm = extract(model, ids, representation="normalised", attention=False)
    assert norm["x"].shape == ds["x"].shape
    np.testing.assert_array_equal(norm["x"].isel(layer=-1).values, out.hidden_states[-1].numpy())


def test_hf_text_padding_and_sdpa_switch(hf_dir, tmp_path):
    family, path = hf_dir
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="sdpa").eval()
    tok = _tokenizer(tmp_path)
    ds = extract(model, ["the cat sat on a mat", "a dog ran"], tokenizer=tok)
    assert model.config._attn_implementation == "sdpa"  # switched to eager for the pass and back
    assert ds["token_str"].values[0, 1] == "cat" and ds["token_mask"].values[1].tolist() == [1, 1, 1, 0, 0, 0]
    assert ds.sizes["token"] == 6
    assert np.isfinite(attention_layers(ds["attention"]).values).all()


def test_hf_without_attention_weights_fails_clearly(hf_dir, monkeypatch):
    _, path = hf_dir
    model, _ = load_hf(path, attn_implementation="sdpa")
    monkeypatch.setattr(
        type(model),
        "set_attn_implementation",
        lambda self, impl: (_ for _ in ()).throw(RuntimeError("not supported")),
    )
    with pytest.raises(ValueError, match="cannot produce attention weights"):
        extract(model, torch.zeros(1, 4, dtype=torch.long))
    ds = extract(model, torch.zeros(1, 4, dtype=torch.long), attention=False)
    assert "attention" not in ds


# --- CLI and netCDF -----------------------------------------------------------------------------
def test_cli_extract_and_compare(tmp_path, capsys):
    from analysis.cli import main
    from particles.nn import save_checkpoint

    m = _model("digits-vit", "krause", d_model=16, n_layers=2)
    save_checkpoint(m, dict(task="digits-vit", attention="krause", config=m.config), tmp_path / "k")
    out = tmp_path / "k.nc"
    assert main(["extract", "--checkpoint", str(tmp_path / "k.pt"), "--samples", "4", "-o", str(out)]) == 0
    ds = xr.open_dataset(out)
    assert ds["x"].shape == (4, 3, 17, 16) and ds.attrs["task"] == "digits-vit"
    _, path = _save_hf("llama", tmp_path / "llama")
    hf_out = tmp_path / "hf.nc"
    assert main(["extract", "--hf", str(path), "--text", "the cat sat", "--reduce", "-o", str(hf_out)]) == 0
    capsys.readouterr()
    assert main(["compare", str(out), str(hf_out), "--fit", "--quick"]) == 0
    text = capsys.readouterr().out
    assert "eff.rank" in text and "fitted" in text
    assert main(["extract", "--checkpoint", str(tmp_path / "missing.pt"), "-o", str(out)]) == 2
    assert main(["extract", "--hf", str(path), "-o", str(out)]) == 2  # no --text/--ids
    assert main(["compare", str(tmp_path / "nope.nc")]) == 2


def test_make_compare_writes_png_pdf_nc(tmp_path):
    from analysis.bridge import make_compare
    from particles.nn import save_checkpoint

    for att in ("krause", "softmax"):
        m = _model("digits-vit", att, d_model=16, n_layers=2)
        save_checkpoint(
            m, dict(task="digits-vit", attention=att, seed=0, config=m.config), tmp_path / f"ck/{att}"
        )
    cmp = make_compare(
        "digits-vit",
        quick=True,
        out=tmp_path / "fig",
        progress=False,
        checkpoints=tmp_path / "ck",
        n_samples=3,
    )
    for ext in ("png", "pdf", "nc"):
        assert (tmp_path / f"fig/compare_digits-vit.{ext}").stat().st_size > 0
    assert "krause trained" in cmp["model"].values and "softmax SA fit" in cmp["model"].values
    assert "fitted presets" in cmp.attrs["table"]
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        make_compare("recall", quick=True, out=tmp_path / "fig", progress=False, checkpoints=tmp_path / "ck")


@pytest.mark.parametrize("kind", ["softmax", "krause"])
def test_single_head_attention_is_a_kernel_family_member(kind):
    """A bias-free single-head attention equals the particles reference kernel with Q = W_q, K = W_k,
    V = W_o W_v: the same weights a_ij and the same velocity Σ_j a_ij V x_j."""
    from analysis.bridge.compare import as_interaction
    from particles import reference
    from particles.nn import make_attention

    torch.manual_seed(0)
    spec = dict(kind=kind, causal=True, window=5, top_k=3, bias=False) | (
        {"sigma": 1.5} if kind == "krause" else {}
    )
    attn = make_attention(spec, 8, 1).double()
    x = torch.randn(1, 9, 8, dtype=torch.float64)
    with torch.no_grad():
        out, a = attn(x, return_attention=True)
    it = as_interaction(attn)
    np.testing.assert_allclose(reference.weights(x[0].numpy(), it), a[0, 0].numpy(), atol=1e-12)
    np.testing.assert_allclose(reference.velocity(x[0].numpy(), it), out[0].numpy(), atol=1e-12)
    with pytest.raises(ValueError, match="single head"):
        as_interaction(make_attention(dict(kind=kind, bias=False), 8, 2))


# --- hook points, token mask, batching (issues 17, 19) -------------------------------------------
def _no_hooks_left(model):
    return _hook_count(model) == 0


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hook_points_named_like_transformer_lens_and_removed(vit, images):
    from particles.nn.hooks import capture, hook_sites

    m = vit["hybrid"]
    sites = hook_sites(m)
    for name in (
        "blocks.0.hook_resid_pre",
        "blocks.2.hook_resid_post",
        "blocks.1.ln1.hook_normalized",
        "blocks.1.attn.hook_pattern",
        "blocks.1.attn.hook_gate",
        "blocks.1.attn.softmax.hook_pattern",
        "blocks.1.attn.krause.hook_pattern",
        "ln_final.hook_normalized",
    ):
        assert name in sites, name
    hs, _, normed = _manual(m, images)
    with capture(sites, ["blocks.1.hook_resid_pre", "blocks.1.ln1.hook_normalized"]) as got, torch.no_grad():
        m(images)
    torch.testing.assert_close(got["blocks.1.hook_resid_pre"], hs[1], rtol=0, atol=0)
    torch.testing.assert_close(got["blocks.1.ln1.hook_normalized"], normed[1], rtol=0, atol=0)
    assert _no_hooks_left(m)
    with pytest.raises(ValueError, match="unknown hook points"):
        with capture(sites, ["blocks.9.hook_resid_pre"]):
            pass
    with pytest.raises(RuntimeError, match="boom"), capture(sites, ["blocks.0.attn.hook_pattern"]):
        raise RuntimeError("boom")
    assert _no_hooks_left(m)
    extract(m, images, reduce=True)
    assert _no_hooks_left(m)


def test_ours_token_mask_batches_and_sink_excess(vit, images):
    m = vit["hybrid"]
    ds = extract(m, images)
    assert ds["token_mask"].dtype == bool and ds["x"]["token_mask"].dims == ("sample", "token")
    assert ds["token_mask"].values.all()
    one = extract(m, images, batch_size=1, progress=True)
    np.testing.assert_array_equal(one["x"].values, ds["x"].values)
    np.testing.assert_allclose(one["attention"].values, ds["attention"].values, atol=1e-7)
    np.testing.assert_array_equal(one["gate"].values, ds["gate"].values)
    red = extract(m, images, reduce=True, batch_size=2)
    full = attention_layers(ds["attention"])
    np.testing.assert_allclose(
        attention_layers(red["sink_excess"]).values, analysis.sink_excess(full, over=()).values, atol=1e-9
    )


def _llama_hybrid(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from particles.nn import krausify

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        vocab_size=16,
        attn_implementation="eager",
    )
    model = krausify(LlamaForCausalLM(cfg).eval(), window=3, top_k=2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.gate.weight.normal_()
            layer.self_attn.krause.q_proj.weight.add_(
                0.5 * torch.randn_like(layer.self_attn.krause.q_proj.weight)
            )
    return model


def test_hf_krausified_hybrid_schema_and_reduce():
    """attention = Σ_b g_ib a^b_ij, branch_attention (softmax, krause), gate (sample, layer, token,
    branch); the softmax branch is what outputs.attentions would hold in the official code; reduce=True
    gives the same metrics without any T×T map."""
    model = _llama_hybrid()
    ids = torch.randint(0, 16, (3, 9), generator=torch.Generator().manual_seed(0))
    ds = extract(model, ids)
    assert ds.attrs["attention_kind"] == "hybrid" and list(ds["branch"].values) == ["softmax", "krause"]
    assert ds["branch_attention"].dims == ("sample", "branch", "layer", "head", "query", "key")
    assert ds["gate"].dims == ("sample", "layer", "token", "branch")
    g = attention_layers(ds["gate"]).values
    b = attention_layers(ds["branch_attention"]).values
    # g (S, L, T, 2), b (S, 2, L, H, T, T)
    mix = g[:, :, None, :, 0, None] * b[:, 0] + g[:, :, None, :, 1, None] * b[:, 1]
    np.testing.assert_allclose(attention_layers(ds["attention"]).values, mix, atol=1e-6)
    np.testing.assert_allclose(g.sum(-1), 1.0, atol=1e-6)
    a_k = b[:, 1]
    i, j = np.indices((9, 9))
    assert (a_k[..., (j > i) | (j <= i - 3)] == 0).all() and ((a_k > 0).sum(-1) <= 2).all()
    np.testing.assert_allclose(ds["sigma"].isel(layer=0).values, 5.5, rtol=1e-6)
    with torch.no_grad():
        out = model(ids, output_attentions=True, output_hidden_states=True)
    np.testing.assert_allclose(ds["attention"].isel(layer=0).values, out.attentions[0].numpy(), atol=1e-7)
    np.testing.assert_array_equal(ds["x"].isel(layer=-1).values, out.hidden_states[-1].numpy())
    before = _hook_count(model)  # transformers' own output-capturing hooks, installed once
    red = extract(model, ids, reduce=True)
    assert _hook_count(model) == before  # ours are gone
    assert "attention" not in red and "branch_attention" not in red and "gate" in red
    for name, fn in (
        ("first_token_mass", analysis.first_token_mass),
        ("attention_entropy", analysis.attention_entropy),
    ):
        np.testing.assert_allclose(
            attention_layers(red[f"branch_{name}"]).values,
            fn(attention_layers(ds["branch_attention"])).values,
            atol=1e-6,
        )


def test_hf_padding_honoured_by_reductions_and_metrics():
    """Left-padded batch: token_mask is a boolean coordinate on x, the in-hook reductions equal the
    metrics of the full maps with that mask, and a padded sample's real part equals it alone."""
    model = _llama_hybrid()
    ids = torch.randint(3, 16, (2, 8), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    am[1, :3] = 0
    ds = extract(model, {"input_ids": ids, "attention_mask": am})
    assert ds["x"]["token_mask"].dtype == bool
    assert ds["token_mask"].values[1].tolist() == [False] * 3 + [True] * 5
    red = extract(model, {"input_ids": ids, "attention_mask": am}, reduce=True)
    full = attention_layers(ds["attention"])
    np.testing.assert_allclose(
        attention_layers(red["first_token_mass"]).values,
        analysis.first_token_mass(full, token_mask=ds["token_mask"]).values,
        atol=1e-6,
    )
    alone = extract(model, {"input_ids": ids[1:, 3:], "attention_mask": am[1:, 3:]}, reduce=True)
    np.testing.assert_allclose(
        attention_layers(red["first_token_mass"]).values[1],
        attention_layers(alone["first_token_mass"]).values[0],
        atol=1e-5,
    )


def test_hf_text_without_pad_token(tmp_path):
    """GPT-2-style tokenizer (no pad token): one text and a batch of texts both extract; padding is
    on the right with the end-of-text id and masked; the tokenizer is left as it was."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {
        "<|endoftext|>": 0,
        **{w: i + 1 for i, w in enumerate("the cat sat on a mat and dog ran".split())},
    }
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    assert fast.pad_token is None
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32, vocab_size=16)).eval()
    one = extract(model, "the cat sat", tokenizer=fast)
    assert one.sizes["token"] == 3 and one["token_mask"].values.all()
    two = extract(model, ["the cat sat on a mat", "a dog"], tokenizer=fast, reduce=True)
    assert two["token_mask"].values[1].tolist() == [True, True] + [False] * 4
    assert two["token_id"].values[1, 2:].tolist() == [0] * 4 and fast.pad_token is None
    np.testing.assert_allclose(
        two["x"].isel(sample=1, token=slice(0, 2)).values,
        extract(model, "a dog", tokenizer=fast)["x"].isel(sample=0).values,
        atol=1e-5,
    )


def test_transformer_lens_hooked_transformer():
    """A tiny HookedTransformer (built here, no download): layer l = blocks.l.hook_resid_pre, layer L
    = ln_final.hook_normalized, attention = blocks.l.attn.hook_pattern, as run_with_cache gives them."""
    tl = pytest.importorskip("transformer_lens")
    cfg = tl.HookedTransformerConfig(
        n_layers=2,
        d_model=16,
        n_ctx=16,
        d_head=4,
        n_heads=4,
        d_vocab=20,
        act_fn="gelu",
        normalization_type="LN",
    )
    torch.manual_seed(0)
    model = tl.HookedTransformer(cfg).eval()
    ids = torch.randint(0, 20, (2, 7), generator=torch.Generator().manual_seed(0))
    ds = extract(model, ids)
    _, cache = model.run_with_cache(ids)
    assert ds.attrs["source"] == "transformer_lens" and ds["x"].shape == (2, 3, 7, 16)
    for layer in range(2):
        np.testing.assert_array_equal(
            ds["x"].isel(layer=layer).values, cache[f"blocks.{layer}.hook_resid_pre"].numpy()
        )
        np.testing.assert_array_equal(
            ds["attention"].isel(layer=layer).values, cache[f"blocks.{layer}.attn.hook_pattern"].numpy()
        )
    np.testing.assert_array_equal(ds["x"].isel(layer=2).values, cache["ln_final.hook_normalized"].numpy())
    assert np.isnan(ds["attention"].isel(layer=2)).all() and ds.attrs["causal"] == 1
    red = extract(model, ids, reduce=True, representation="normalised")
    np.testing.assert_array_equal(
        red["x"].isel(layer=1).values, cache["blocks.1.ln1.hook_normalized"].numpy()
    )
    np.testing.assert_allclose(
        attention_layers(red["first_token_mass"]).values,
        analysis.first_token_mass(attention_layers(ds["attention"])).values,
        atol=1e-6,
    )
    assert _no_hooks_left(model)
