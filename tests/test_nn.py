"""particles.nn: torch attention vs the numpy reference, masks, models, training, checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from particles import reference  # noqa: E402
from particles.interaction import make_interaction  # noqa: E402
from particles.nn import (  # noqa: E402
    CausalLM,
    CheckpointError,
    HybridAttention,
    KrauseAttention,
    SoftmaxAttention,
    ViT,
    grid_mask,
    load_checkpoint,
    save_checkpoint,
)
from particles.nn.checkpoint import shipped_dir  # noqa: E402
from particles.nn.hooks import capture, hook_sites  # noqa: E402
from particles.nn.train import TASKS, train  # noqa: E402

CHECKPOINTS = shipped_dir()


def _set(linear, matrix):
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(np.array(matrix)))


@pytest.mark.parametrize("window,top_k,sigma", [(5, 3, 1.3), (None, 4, 0.7), (3, None, 2.0), (12, 12, 1.0)])
def test_krause_matches_numpy_reference(window, top_k, sigma):
    rng = np.random.default_rng(0)
    n, d = 12, 5
    x = rng.normal(size=(n, d))
    Q, K = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    it = make_interaction("krause", sigma=sigma, window=window, causal=True, top_k=top_k, Q=Q, K=K)
    expected = reference.weights(x, it)
    attn = KrauseAttention(d, 1, sigma=sigma, causal=True, window=window, top_k=top_k, bias=False).double()
    _set(attn.q_proj, Q)
    _set(attn.k_proj, K)
    with torch.no_grad():
        attn.log_sigma.fill_(np.log(sigma))  # exact in float64
    _, a = attn(torch.as_tensor(x)[None], return_attention=True)
    np.testing.assert_allclose(a[0, 0].detach().numpy(), expected, rtol=1e-10, atol=1e-12)


def test_softmax_matches_numpy_reference():
    rng = np.random.default_rng(1)
    n, d = 10, 4
    x = rng.normal(size=(n, d))
    Q, K = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    attn = SoftmaxAttention(d, 1, causal=True, window=4, top_k=2, bias=False).double()
    _set(attn.q_proj, Q)
    _set(attn.k_proj, K)
    it = make_interaction("sa", beta=attn.beta, window=4, causal=True, top_k=2, Q=Q, K=K)
    _, a = attn(torch.as_tensor(x)[None], return_attention=True)
    np.testing.assert_allclose(a[0, 0].detach().numpy(), reference.weights(x, it), rtol=1e-10, atol=1e-12)


def test_grid_mask_neighbours_and_cls():
    m = grid_mask(4, 4)
    assert m.shape == (17, 17) and m[0].all() and m[:, 0].all()
    # patch (1, 1) = token 1 + 5 sees itself, up, down, left, right and CLS
    assert set(torch.nonzero(m[6]).flatten().tolist()) == {0, 2, 5, 6, 7, 10}
    assert (m == m.T).all()


@pytest.mark.parametrize(
    "make",
    [
        lambda: KrauseAttention(16, 4, grid=(3, 3), top_k=4),
        lambda: SoftmaxAttention(16, 4, grid=(3, 3)),
        lambda: KrauseAttention(16, 4, causal=True, window=3, top_k=2),
        lambda: SoftmaxAttention(16, 4, causal=True),
        lambda: HybridAttention(
            16, 4, softmax=dict(causal=True), krause=dict(causal=True, window=3, top_k=2)
        ),
    ],
)
def test_masks_rows_and_return_attention(make):
    torch.manual_seed(0)
    attn = make().eval()
    T = 10
    x = torch.randn(3, T, 16)
    out = attn(x)
    out2, a = attn(x, return_attention=True)
    hybrid = isinstance(attn, HybridAttention)
    names = ["hook_pattern", "hook_gate", "krause.hook_pattern"] if hybrid else ["hook_pattern"]
    with capture(hook_sites(attn), names) as got:
        out3 = attn(x)
    assert torch.equal(out, out2) and torch.equal(out, out3)
    assert torch.equal(got["hook_pattern"], a.detach())
    assert not any(m._forward_hooks for m in attn.modules())  # capture removed its hooks
    assert a.shape == (3, 4, T, T)
    torch.testing.assert_close(a.sum(-1), torch.ones(3, 4, T))
    inner = attn.krause if hybrid else attn
    if hybrid:
        assert got["hook_gate"].shape == (3, T, 2)
        a = got["krause.hook_pattern"]
    support = inner.support(T)
    assert (a[..., ~support] == 0).all()  # masked entries exactly 0
    if inner.top_k is not None:
        assert ((a > 0).sum(-1) <= inner.top_k).all()


def test_krause_sigma_per_head_and_shared():
    assert KrauseAttention(8, 4, sigma=2.5).sigma.shape == (4,)
    shared = KrauseAttention(8, 4, sigma=2.5, sigma_per_head=False)
    assert shared.log_sigma.numel() == 1 and torch.allclose(shared.sigma, torch.full((4,), 2.5))
    with pytest.raises(ValueError, match="sigma"):
        KrauseAttention(8, 2, sigma=0.0)
    with pytest.raises(ValueError, match="window"):
        KrauseAttention(8, 2, causal=True, window=0)


def test_models_shapes_and_hooks():
    vit = ViT(attention=dict(kind="krause", grid=[4, 4], top_k=[2, 3], sigma=2.5), n_layers=2, d_model=16)
    x = torch.rand(5, 8, 8) * 16
    assert vit(x).shape == (5, 10)
    assert vit.embed(x).shape == (5, 17, 16)
    assert vit.blocks[0].attn.top_k == 2 and vit.blocks[1].attn.top_k == 3
    lm = CausalLM(
        vocab_size=17,
        seq_len=64,
        bos=17,
        d_model=16,
        n_layers=2,
        attention=dict(kind="krause", causal=True, window=8, top_k=4),
    )
    tokens = torch.randint(17, (3, 64))
    assert lm(tokens).shape == (3, 64, 17) and lm.embed(tokens).shape == (3, 64, 16)
    assert hasattr(lm.blocks[0], "norm1") and hasattr(lm.blocks[0].attn, "q_proj")


@pytest.mark.parametrize("kind", ["krause", "softmax", "hybrid"])
def test_cached_decoding_matches_full_forward(kind):
    torch.manual_seed(0)
    spec = dict(
        krause=dict(kind="krause", causal=True, window=5, top_k=3),
        softmax=dict(kind="softmax", causal=True),
        hybrid=dict(kind="hybrid", softmax=dict(causal=True), krause=dict(causal=True, window=5, top_k=3)),
    )
    lm = CausalLM(vocab_size=7, seq_len=12, bos=7, d_model=16, n_layers=2, attention=spec[kind]).eval()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = lm.generate(4, generator=g1, use_cache=True)
    b = lm.generate(4, generator=g2, use_cache=False)
    assert a.shape == (4, 12) and torch.equal(a, b)
    if kind == "krause":  # fixed-size cache
        cache = {}
        for _ in range(9):
            lm.blocks[0].attn.step(torch.randn(2, 1, 16), cache)
        assert cache["k"].shape[2] == 5


def test_one_epoch_on_subset_lowers_loss():
    task = TASKS["digits-vit"]()
    task.setup(subset=256)
    over = dict(d_model=32, n_layers=2)
    torch.manual_seed(0)
    from particles.nn.train import build_model

    fresh = build_model(task.config("krause", **over)).eval()
    model, card = train("digits-vit", "krause", epochs=1, seed=0, subset=256, overrides=over, progress=False)
    x, y = task.Xtr, task.ytr
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(fresh(x), y).item()
        after = torch.nn.functional.cross_entropy(model(x), y).item()
    assert after < before
    assert card["steps"] == 256 // task.batch_size


def test_training_is_deterministic():
    kw = dict(epochs=1, seed=3, subset=64, overrides=dict(d_model=16, n_layers=1), progress=False)
    m1, _ = train("digits-vit", "softmax", **kw)
    m2, _ = train("digits-vit", "softmax", **kw)
    for p, q in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(p, q)


def test_checkpoint_roundtrip_and_damage(tmp_path):
    model, card = train(
        "digits-vit", "krause", epochs=1, subset=32, overrides=dict(d_model=16, n_layers=1), progress=False
    )
    card = save_checkpoint(model, card, tmp_path / "tiny")
    loaded = load_checkpoint(tmp_path / "tiny.pt")
    assert not loaded.training and loaded.config == json.loads(json.dumps(model.config))
    x = torch.rand(2, 8, 8) * 16
    torch.testing.assert_close(loaded(x), model(x))
    raw = bytearray((tmp_path / "tiny.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / "tiny.pt").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(tmp_path / "tiny.pt")
    (tmp_path / "tiny.pt").write_bytes(bytes(raw[:100]))  # truncated, sha256 check off
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(tmp_path / "tiny.pt", verify=False)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("attention", ["krause", "softmax"])
def test_shipped_digits_vit_checkpoints(attention):
    path = CHECKPOINTS / f"digits-vit-{attention}.pt"
    if not path.exists():
        pytest.skip("checkpoint not shipped")
    model = load_checkpoint(path)
    task = TASKS["digits-vit"]()
    task.setup()
    acc = task.evaluate(model)["test_accuracy"]
    assert acc == pytest.approx(model.card["metrics"]["test_accuracy"], abs=1e-6)
    assert acc >= 0.95
    assert path.stat().st_size <= 5 * 2**20


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(CHECKPOINTS.glob("*.pt")), ids=lambda p: p.stem)
def test_all_shipped_checkpoints_load(path):
    model = load_checkpoint(path)
    assert model.card["sha256"] and path.stat().st_size <= 5 * 2**20
    if model.card["task"] in ("digits-vit", "text-lm"):
        task = TASKS[model.card["task"]]()
        task.setup()
        key = {"digits-vit": "test_accuracy", "text-lm": "test_bits_per_char"}[model.card["task"]]
        assert task.evaluate(model)[key] == pytest.approx(model.card["metrics"][key], rel=1e-4)


@pytest.mark.parametrize("task", ["digits-vit", "text-bos"])
def test_ablation_cells_build_the_attention_they_claim(task):
    """Each cell of the 2 × 2 × 2 ablation: the score its name says, the locality support (patch grid /
    causal window) or none, and top-k or not; everything else identical."""
    from particles.nn.train import build_model

    t = TASKS[task]()
    over = dict(d_model=16, n_heads=2, n_layers=2)
    names = [n for n in t.attentions if n.split("+")[0] in ("dot", "rbf")]
    assert len(names) == 8
    local = "grid" if task == "digits-vit" else "window"
    x = torch.rand(3, 8, 8) * 16 if task == "digits-vit" else torch.randint(97, (3, 64))
    for name in names:
        torch.manual_seed(0)
        model = build_model(t.config(name, **over)).eval()
        parts = set(name.split("+"))
        for layer, block in enumerate(model.blocks):
            attn = block.attn
            assert isinstance(attn, KrauseAttention if "rbf" in parts else SoftmaxAttention), name
            h = block.norm1(model.embed(x))
            _, a = attn(h, return_attention=True)
            T = a.shape[-1]
            causal = torch.tril(torch.ones(T, T, dtype=torch.bool)) if task == "text-bos" else None
            if local in parts:
                if task == "digits-vit":
                    assert torch.equal(attn.support(T), grid_mask(4, 4))
                else:
                    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
                    assert torch.equal(attn.support(T), (i - j >= 0) & (i - j < t.window))
            else:
                assert attn.support(T) is None if causal is None else torch.equal(attn.support(T), causal)
            allowed = attn.support(T) if attn.support(T) is not None else torch.ones(T, T, dtype=torch.bool)
            assert (a[..., ~allowed] == 0).all(), name
            nonzero = (a > 0).sum(-1)
            if "topk" in parts:
                k = attn.top_k
                assert k == (t.attentions[name]["top_k"][layer] if task == "digits-vit" else t.top_k)
                assert (nonzero == torch.minimum(allowed.sum(-1), torch.tensor(k))).all(), name
            else:
                assert attn.top_k is None and (nonzero == allowed.sum(-1)).all(), name
    assert t.attentions["rbf+" + local + "+topk"] == t.attentions["krause"]
    assert t.attentions["dot"] == t.attentions["softmax"]


def test_train_steps_lr_probe_and_loss_curve():
    calls = []

    def probe(model):
        calls.append(model.training)
        return {"n": len(calls)}

    over = dict(d_model=8, n_heads=2, n_layers=1)
    _, card = train(
        "text-bos",
        "dot",
        steps=7,
        lr=5e-4,
        probe=probe,
        probe_every=3,
        log_every=2,
        overrides=over,
        progress=False,
    )
    assert card["steps"] == 7 and card["lr"] == 5e-4
    assert [p["step"] for p in card["probes"]] == [0, 3, 6, 7] and not any(calls)
    assert card["train_loss_steps"] == [2, 4, 6] and len(card["train_loss_curve"]) == 3
    with pytest.raises(ValueError, match="steps"):
        train("text-bos", "dot", steps=0, progress=False)
    with pytest.raises(ValueError, match="lr"):
        train("text-bos", "dot", steps=1, lr=-1.0, progress=False)
