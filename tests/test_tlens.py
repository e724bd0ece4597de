"""TransformerLens interop and text without a pad token (issue 19 item 4).

Everything is built here, offline: a tiny GPT-2 (random weights, norm gains and biases perturbed so
that a norm read before its gain shows), the same weights in a HookedTransformer, and a word-level
tokenizer with an end-of-text token but no pad token (GPT-2 style).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

import analysis
from analysis.bridge import attention_layers, extract

transformers = pytest.importorskip("transformers")

WORDS = "the cat sat on a mat and dog ran".split()
V, D, H, L = 16, 16, 2, 2


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _gpt2_tokenizer(path):
    """A GPT-2-style tokenizer: end of text (also BOS) id 0, no pad token; saved to ``path`` and
    loaded back (TransformerLens reloads tokenizers from their directory)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(
        models.WordLevel(
            {"<|endoftext|>": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}, unk_token="<|endoftext|>"
        )
    )
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(path)
    loaded = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    assert loaded.pad_token is None
    return loaded


@pytest.fixture(scope="module")
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=D, n_layer=L, n_head=H, n_positions=32, vocab_size=V)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or "ln_f" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hooked(gpt2, tmp_path_factory):
    """The GPT-2 weights in a HookedTransformer, unprocessed (as ``from_pretrained_no_processing``
    would load them; that needs the hub, so the config is written here and the weights converted by
    TransformerLens's own GPT-2 converter)."""
    tl = pytest.importorskip("transformer_lens")
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    c = gpt2.config
    cfg = tl.HookedTransformerConfig(
        d_model=D,
        d_head=D // H,
        n_heads=H,
        d_mlp=4 * D,
        n_layers=L,
        n_ctx=c.n_positions,
        d_vocab=V,
        eps=c.layer_norm_epsilon,
        act_fn=c.activation_function,
        normalization_type="LN",
        original_architecture="GPT2LMHeadModel",
    )
    tok = _gpt2_tokenizer(tmp_path_factory.mktemp("tok"))
    with warnings.catch_warnings():  # TransformerLens 3 announces HookedTransformer's removal in 4
        warnings.simplefilter("ignore", DeprecationWarning)
        model = tl.HookedTransformer(cfg, tokenizer=tok)
    missing = model.load_state_dict(convert_gpt2_weights(gpt2, cfg), strict=False).missing_keys
    assert all(k.endswith(("attn.mask", "attn.IGNORE", "unembed.b_U")) for k in missing), missing
    return model.eval()


def _ids(shape=(2, 7)):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(0))


def test_hooked_transformer_equals_hf_gpt2(gpt2, hooked):
    """Same weights: every layer (embeddings, block outputs, after the final norm with its gain),
    the attention patterns and the reductions agree with the HF extraction to 1e-5, in both
    representations; layer 0 and the first attention also equal a direct computation."""
    ids = _ids()
    with torch.no_grad():
        np.testing.assert_allclose(hooked(ids).numpy(), gpt2(ids).logits.numpy(), atol=1e-5)  # conversion
    for representation in ("residual", "normalised"):
        hf = extract(gpt2, ids, representation=representation)
        tl = extract(hooked, ids, representation=representation)
        assert hf["x"].shape == tl["x"].shape == (2, L + 1, 7, D)
        np.testing.assert_allclose(tl["x"].values, hf["x"].values, atol=1e-5)
        np.testing.assert_allclose(tl["attention"].values, hf["attention"].values, atol=1e-5)
        assert tl.attrs["source"] == "transformer_lens" and tl.attrs["causal"] == 1
    assert "ln_final" in tl.attrs["last_layer_note"] and _hook_count(hooked) == 0
    # direct: x0 = wte[ids] + wpe[pos]; a0 = softmax(q k^T / sqrt(d_head) + causal mask) on ln_1(x0)
    t = gpt2.transformer
    with torch.no_grad():
        x0 = t.wte.weight[ids] + t.wpe.weight[: ids.shape[1]]
        q, k, _ = t.h[0].attn.c_attn(t.h[0].ln_1(x0)).split(D, -1)
        q, k = (z.view(2, 7, H, D // H).transpose(1, 2) for z in (q, k))
        s = q @ k.transpose(-1, -2) / (D // H) ** 0.5
        a0 = torch.softmax(s.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), -torch.inf), -1)
    res = extract(hooked, ids)
    np.testing.assert_allclose(res["x"].isel(layer=0).values, x0.numpy(), atol=1e-6)
    np.testing.assert_allclose(res["attention"].isel(layer=0).values, a0.numpy(), atol=1e-6)
    # processed weights (what from_pretrained does): same patterns, centred residual stream, and
    # layer L without the folded gain: the documented reason to load unprocessed
    processed = copy.deepcopy(hooked)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processed.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    folded, hf = extract(processed, ids), extract(gpt2, ids)
    np.testing.assert_allclose(folded["attention"].values, hf["attention"].values, atol=1e-5)
    centred = hf["x"] - hf["x"].mean("component")
    np.testing.assert_allclose(
        folded["x"].isel(layer=slice(0, L)).values, centred.isel(layer=slice(0, L)).values, atol=1e-5
    )
    assert np.abs(folded["x"].isel(layer=L).values - hf["x"].isel(layer=L).values).max() > 0.1
    red_hf, red_tl = (extract(m, ids, reduce=True, sink_k=1) for m in (gpt2, hooked))
    for name in analysis.bridge.REDUCTIONS:
        np.testing.assert_allclose(red_tl[name].values, red_hf[name].values, atol=1e-5, equal_nan=True)
    assert "attention" not in red_tl and red_tl.attrs["sink_k"] == 1


def test_hooked_transformer_text_without_pad_token(hooked):
    """Texts of different lengths through a tokenizer without a pad token: right padding with the
    end-of-text id, masked; BOS (the same id 0) stays a real token; a padded sample's real tokens
    equal the text extracted alone; padding never counts in the reductions."""
    one = extract(hooked, "the cat sat")
    assert one.sizes["token"] == 4 and one["token_mask"].values.all()  # BOS + 3 words
    assert one["token_id"].values[0].tolist() == [0, 1, 2, 3]
    texts = ["the cat sat on a mat", "a dog"]
    two = extract(hooked, texts)
    assert two["token_mask"].values.tolist() == [[True] * 7, [True] * 3 + [False] * 4]
    assert two["token_id"].values[1].tolist() == [0, 5, 8, 0, 0, 0, 0]
    alone = extract(hooked, "a dog")
    np.testing.assert_allclose(
        two["x"].isel(sample=1, token=slice(0, 3)).values, alone["x"].values[0], atol=1e-5
    )
    np.testing.assert_allclose(
        two["attention"].isel(sample=1, query=slice(0, 3), key=slice(0, 3)).values,
        alone["attention"].values[0],
        atol=1e-6,
    )
    red = extract(hooked, texts, reduce=True)
    np.testing.assert_allclose(
        attention_layers(red["attention_entropy"]).values[1],
        attention_layers(extract(hooked, "a dog", reduce=True)["attention_entropy"]).values[0],
        atol=1e-5,
    )
    assert hooked.tokenizer.padding_side == "right" and _hook_count(hooked) == 0


def test_activation_cache_equals_live_extraction(hooked):
    """extract(cache, inputs) on run_with_cache's ActivationCache = extract(model, inputs): same
    states (layer L from unembed.hook_in or ln_final applied to the last resid_post), patterns,
    reductions and token mask; bad caches and mismatched inputs are refused naming the argument."""
    ids = _ids()
    _, cache = hooked.run_with_cache(ids)
    for kw in (dict(), dict(representation="normalised"), dict(reduce=True, sink_k=1)):
        live, cached = extract(hooked, ids, **kw), extract(cache, ids, **kw)
        assert sorted(cached.data_vars) == sorted(live.data_vars)
        for name in live.data_vars:
            np.testing.assert_allclose(cached[name].values, live[name].values, atol=1e-6, equal_nan=True)
        assert cached.attrs["from_activation_cache"] == 1
    np.testing.assert_array_equal(cached["token_id"].values, ids.numpy())
    no_ids = extract(cache, None)
    assert "token_id" not in no_ids.coords and no_ids["token_mask"].values.all()
    del cache.cache_dict["unembed.hook_in"]  # older TransformerLens: recomputed through ln_final
    np.testing.assert_allclose(extract(cache, ids)["x"].values, extract(hooked, ids)["x"].values, atol=1e-6)
    texts = ["the cat sat on a mat", "a dog"]
    _, tcache = hooked.run_with_cache(texts)
    from_text = extract(tcache, texts)
    assert from_text["token_mask"].values[1].tolist() == [True] * 3 + [False] * 4
    np.testing.assert_allclose(
        from_text["x"].isel(sample=1, token=slice(0, 3)).values,
        extract(hooked, "a dog")["x"].values[0],
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="inputs"):
        extract(cache, ids[:, :5])
    _, partial = hooked.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_pre"))
    with pytest.raises(ValueError, match="model: the ActivationCache lacks"):
        extract(partial, ids)


def test_cli_extract_hf_text_without_pad_token(gpt2, tmp_path, capsys):
    """`ksync extract --hf DIR --text ...` with a GPT-2-style tokenizer (no pad token), one text and
    two of different lengths; the padding is masked in the file (token_mask read back as bool)."""
    from analysis.bridge.data import load
    from analysis.cli import main

    path = tmp_path / "gpt2"
    gpt2.save_pretrained(path)
    _gpt2_tokenizer(path)
    one, two = tmp_path / "one.nc", tmp_path / "two.nc"
    assert main(["extract", "--hf", str(path), "--text", "a dog", "-o", str(one)]) == 0
    args = ["extract", "--hf", str(path), "--text", "the cat sat on a mat", "--text", "a dog"]
    assert main(args + ["--reduce", "-o", str(two)]) == 0
    assert main(args + ["-o", str(tmp_path / "full.nc")]) == 0
    capsys.readouterr()
    a, b, full = load(one), load(two), load(tmp_path / "full.nc")
    assert a.sizes["token"] == 2 and a["token_mask"].dtype == bool and a["token_mask"].values.all()
    assert b["token_mask"].values.tolist() == [[True] * 6, [True] * 2 + [False] * 4]
    assert b["token_id"].values[1, 2:].tolist() == [0] * 4  # padded with end of text
    np.testing.assert_allclose(
        full["x"].isel(sample=1, token=slice(0, 2)).values, a["x"].values[0], atol=1e-5
    )
    np.testing.assert_allclose(
        attention_layers(b["attention_entropy"]).values[1],
        analysis.attention_entropy(attention_layers(a["attention"])).values[0],
        atol=1e-5,
    )
