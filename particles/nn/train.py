"""Training tasks: digits-vit, digits-ar, text-lm, text-bos, recall, backcopy, and the ablation cells.

``train(task, attention, epochs=None, seed=0)`` → (model, card). ``attention`` is a name from the
task's ``attentions`` (including the 2 × 2 × 2 ablation cells of :func:`ablation_cells`, e.g.
"dot+grid", "rbf+window+topk") or an attention spec dict; ``steps=`` fixes the number of optimiser
steps instead of ``epochs``; ``probe=fn`` is called on the model every ``probe_every`` steps (and at
steps 0 and the end) and its dicts are kept in the card's ``probes``. Everything is seeded (model init,
batch order, synthetic data), single-process, ``torch.set_num_threads(1)`` by default (on a
shared 2-core machine two OpenMP threads were ~10× slower than one, from spin-waiting); the same
seed and thread count give the same weights. Optimiser: AdamW, linear warm-up (5 %) then cosine
decay, gradient clipping at 1.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from . import data
from .models import CausalLM, ViT

LN2 = math.log(2)

# --- attention variants per task ---------------------------------------------------------------
VIT_TOPK = [3, 4, 5, 6]  # per layer, k → 2k as in the paper's ViT
VIT_GRID = [4, 4]
VIT_ATTENTIONS = {
    "krause": dict(kind="krause", grid=VIT_GRID, top_k=VIT_TOPK, sigma=2.5, sigma_per_head=False),
    "softmax": dict(kind="softmax"),
    "hybrid": dict(
        kind="hybrid", softmax={}, krause=dict(grid=VIT_GRID, top_k=VIT_TOPK, sigma=2.5, sigma_per_head=False)
    ),
    # ablations (design: isolate the bounded-confidence rule)
    "rbf": dict(kind="krause", sigma=2.5, sigma_per_head=False),  # RBF scores alone
    "dot-local": dict(kind="softmax", grid=VIT_GRID),  # dot product + locality
    "dot-topk": dict(kind="softmax", top_k=VIT_TOPK),  # dot product + top-k
}
ABLATIONS = ("rbf", "dot-local", "dot-topk", "krause", "softmax")


def ablation_cells(
    *, locality: dict, top_k, sigma: float, sigma_per_head: bool, causal: bool = False
) -> dict:
    """The 2 × 2 × 2 ablation: score {dot, rbf} × locality {none, `locality`} × top-k {off, `top_k`}.

    Names: score, then "+grid"/"+window" and "+topk" for the components switched on ("dot" is plain
    softmax attention, "rbf+grid+topk" / "rbf+window+topk" the full Krause attention of the task).
    ``locality`` is ``{"grid": [h, w]}`` (ViT) or ``{"window": w}`` (causal); every other setting is
    identical across cells, so each cell differs from its neighbours in one component only.
    """
    where = "grid" if "grid" in locality else "window"
    cells = {}
    for score in ("dot", "rbf"):
        for local in (False, True):
            for topk in (False, True):
                spec = dict(kind="softmax" if score == "dot" else "krause")
                if causal:
                    spec["causal"] = True
                if local:
                    spec.update(locality)
                if topk:
                    spec["top_k"] = top_k
                if score == "rbf":
                    spec.update(sigma=sigma, sigma_per_head=sigma_per_head)
                cells["+".join([score] + [where] * local + ["topk"] * topk)] = spec
    return cells


VIT_CELLS = ablation_cells(locality=dict(grid=VIT_GRID), top_k=VIT_TOPK, sigma=2.5, sigma_per_head=False)
VIT_ATTENTIONS.update(VIT_CELLS)


def causal_attentions(window: int, top_k: int, sigma: float = 2.5) -> dict:
    krause = dict(causal=True, window=window, top_k=top_k, sigma=sigma, sigma_per_head=True)
    return {
        "krause": dict(kind="krause", **krause),
        "softmax": dict(kind="softmax", causal=True),
        "hybrid": dict(kind="hybrid", softmax=dict(causal=True), krause=krause),
        **ablation_cells(
            locality=dict(window=window), top_k=top_k, sigma=sigma, sigma_per_head=True, causal=True
        ),
    }


def _steps(n: int, batch: int) -> int:
    return max(1, n // batch)


# --- tasks -------------------------------------------------------------------------------------
class Task:
    """A task: model config, batches, loss and evaluation. Subclasses fill in the details."""

    name = ""
    epochs = 1
    batch_size = 64
    lr = 1e-3
    weight_decay = 0.05
    model_defaults: dict = {}
    attentions: dict = {}

    def config(self, attention, **overrides) -> dict:
        """Model config: the task's defaults with ``attention`` (a name or a spec dict) and overrides."""
        if isinstance(attention, dict):
            if "kind" not in attention:
                raise ValueError(f"attention: a spec dict needs a 'kind', got {attention!r}")
            spec = dict(attention)
        elif attention in self.attentions:
            spec = self.attentions[attention]
        else:
            raise ValueError(
                f"attention for {self.name} must be one of {tuple(self.attentions)}, got {attention!r}"
            )
        return dict(self.model_defaults, attention=spec, **overrides)

    def setup(self, subset: int | None = None):
        pass

    def steps_per_epoch(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def batches(self, generator):  # yields batches for one epoch
        raise NotImplementedError

    def loss(self, model, batch):
        raise NotImplementedError

    def evaluate(self, model) -> dict:
        raise NotImplementedError


class DigitsViT(Task):
    name, epochs, batch_size, lr = "digits-vit", 80, 32, 2e-3
    model_defaults = dict(
        model="vit", image_size=8, patch=2, n_classes=10, d_model=64, n_heads=4, n_layers=4, mlp_ratio=2
    )
    attentions = VIT_ATTENTIONS

    def setup(self, subset=None):
        self.Xtr, self.Xte, self.ytr, self.yte = data.digits_split()
        if subset:
            self.Xtr, self.ytr = self.Xtr[:subset], self.ytr[:subset]

    def steps_per_epoch(self):
        return _steps(len(self.Xtr), self.batch_size)

    def batches(self, g):
        perm = torch.randperm(len(self.Xtr), generator=g)
        for s in range(self.steps_per_epoch()):
            idx = perm[s * self.batch_size : (s + 1) * self.batch_size]
            yield shift_images(self.Xtr[idx], g), self.ytr[idx]

    def loss(self, model, batch):
        return F.cross_entropy(model(batch[0]), batch[1])

    @torch.no_grad()
    def evaluate(self, model):
        logits = model(self.Xte)
        return {
            "test_accuracy": (logits.argmax(1) == self.yte).float().mean().item(),
            "test_loss": F.cross_entropy(logits, self.yte).item(),
            "n_test": len(self.yte),
        }


def shift_images(x, g, max_shift: int = 1):
    """Augmentation: shift each 8×8 image by up to `max_shift` pixels in each direction (zero fill)."""
    B, m = x.shape[0], max_shift
    pad = F.pad(x, (m,) * 4)
    dy, dx = torch.randint(0, 2 * m + 1, (2, B), generator=g)
    rows, cols = dy[:, None] + torch.arange(8), dx[:, None] + torch.arange(8)
    return pad[torch.arange(B)[:, None, None], rows[:, :, None], cols[:, None, :]]


class DigitsAR(Task):
    name, epochs, batch_size, lr = "digits-ar", 30, 32, 2e-3
    model_defaults = dict(
        model="causal_lm", vocab_size=17, seq_len=64, bos=17, d_model=64, n_heads=4, n_layers=4, mlp_ratio=2
    )
    attentions = causal_attentions(window=16, top_k=12)

    def setup(self, subset=None):
        self.train_tokens, self.test_tokens = data.digits_tokens()
        if subset:
            self.train_tokens = self.train_tokens[:subset]

    def steps_per_epoch(self):
        return _steps(len(self.train_tokens), self.batch_size)

    def batches(self, g):
        perm = torch.randperm(len(self.train_tokens), generator=g)
        for s in range(self.steps_per_epoch()):
            yield self.train_tokens[perm[s * self.batch_size : (s + 1) * self.batch_size]]

    def loss(self, model, x):
        return F.cross_entropy(model(x).reshape(-1, 17), x.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model, n_samples: int = 64):
        nll = F.cross_entropy(model(self.test_tokens).reshape(-1, 17), self.test_tokens.reshape(-1))
        g = torch.Generator().manual_seed(0)
        timings = {}
        for name, cache in (("cached", True), ("uncached", False)):
            t0 = time.perf_counter()
            model.generate(n_samples, generator=g, use_cache=cache)
            timings[name] = 1e3 * (time.perf_counter() - t0) / n_samples
        return {
            "test_bits_per_pixel": nll.item() / LN2,
            "n_test_images": len(self.test_tokens),
            "sample_ms_per_image_cached": timings["cached"],
            "sample_ms_per_image_uncached": timings["uncached"],
            "n_samples_timed": n_samples,
        }


class TextLM(Task):
    name, epochs, batch_size, lr = "text-lm", 6, 32, 2e-3
    model_defaults = dict(
        model="causal_lm",
        vocab_size=len(data.CHARS),
        seq_len=128,
        d_model=96,
        n_heads=4,
        n_layers=3,
        mlp_ratio=2,
    )
    attentions = causal_attentions(window=32, top_k=16)
    steps = 100  # random windows per epoch
    extra = 1  # a window holds seq_len + 1 characters: inputs [:-1], targets [1:]

    def setup(self, subset=None):
        self.train_ids, self.test_ids = data.text_split()
        if subset:
            self.train_ids = self.train_ids[:subset]
        self.T = self.model_defaults["seq_len"]

    def steps_per_epoch(self):
        return self.steps

    def batches(self, g):
        for _ in range(self.steps):
            span = self.T + self.extra
            start = torch.randint(len(self.train_ids) - span, (self.batch_size,), generator=g)
            yield torch.stack([self.train_ids[s : s + span] for s in start.tolist()])

    def loss(self, model, x):
        return F.cross_entropy(model(x[:, :-1]).reshape(-1, model.vocab_size), x[:, 1:].reshape(-1))

    @torch.no_grad()
    def evaluate(self, model):
        """Bits per character over the held-out split, in non-overlapping windows of seq_len + 1."""
        n = (len(self.test_ids) - 1) // self.T
        total = 0.0
        for chunk in torch.arange(n).split(64):
            x = torch.stack([self.test_ids[i * self.T : (i + 1) * self.T + 1] for i in chunk.tolist()])
            total += self.loss(model, x).item() * x.shape[0]
        return {
            "test_bits_per_char": total / n / LN2,
            "n_test_chars": n * self.T,
            "n_train_chars": len(self.train_ids),
        }


class TextBOS(TextLM):
    """Character LM with a BOS token at the start of every window (the attention-sink testbed).

    Each training example is a random window of ``seq_len`` characters of the training split; the
    model reads [BOS, c_0, …, c_{T−2}] and predicts c_0 … c_{T−1}, so BOS is always token 0 and
    carries no information about the window — the setting in which Gu et al. (2024) see a
    first-token sink emerge with training. Held out: non-overlapping windows of the test split.
    """

    name, batch_size, lr = "text-bos", 32, 2e-3
    window, top_k = 16, 8
    model_defaults = dict(
        model="causal_lm",
        vocab_size=len(data.CHARS),
        seq_len=64,
        bos=len(data.CHARS),
        d_model=64,
        n_heads=4,
        n_layers=4,
        mlp_ratio=2,
    )
    attentions = causal_attentions(window=window, top_k=top_k)
    steps, epochs = 100, 25  # 2500 steps by default
    extra = 0  # BOS takes the place of the first input: a window holds seq_len characters

    def held_out(self, n: int | None = None) -> torch.Tensor:
        """The first ``n`` (default all) non-overlapping test windows (n, seq_len)."""
        m = len(self.test_ids) // self.T
        n = m if n is None else min(n, m)
        return self.test_ids[: n * self.T].reshape(n, self.T)

    def loss(self, model, x):
        return F.cross_entropy(model(x).reshape(-1, model.vocab_size), x.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model):
        x = self.held_out()
        total = sum(self.loss(model, c).item() * len(c) for c in x.split(128))
        return {"test_bits_per_char": total / len(x) / LN2, "n_test_chars": x.numel()}


class Recall(Task):
    """Multi-query associative recall (:func:`data.recall_batch`), loss on every determined value."""

    name, epochs, batch_size, lr = "recall", 60, 64, 2e-3
    pairs, n_keys, n_values, window = 32, 16, 16, 16
    model_defaults = dict(
        model="causal_lm",
        vocab_size=n_keys + n_values,
        seq_len=2 * pairs,
        d_model=64,
        n_heads=4,
        n_layers=2,
        mlp_ratio=2,
    )
    attentions = causal_attentions(window=window, top_k=8)
    steps = 100

    def _batch(self, n, g):
        return data.recall_batch(n, pairs=self.pairs, n_keys=self.n_keys, n_values=self.n_values, generator=g)

    def setup(self, subset=None):
        self.test = self._batch(2048, torch.Generator().manual_seed(12345))

    def steps_per_epoch(self):
        return self.steps

    def batches(self, g):
        for _ in range(self.steps):
            yield self._batch(self.batch_size, g)

    def loss(self, model, batch):
        return F.cross_entropy(
            model(batch[0]).reshape(-1, model.vocab_size), batch[1].reshape(-1), ignore_index=-100
        )

    @torch.no_grad()
    def evaluate(self, model):
        x, y, dist = self.test
        keep = y >= 0
        correct = (model(x).argmax(-1) == y)[keep].float()
        dist = dist[keep]
        w = self.window
        # the key's earlier value token lies at distance d − 1: visible to a window-w query iff d ≤ w
        bins = {f"{lo}-{hi}": (lo, hi) for lo, hi in ((2, w), (w + 1, 2 * w), (2 * w + 1, 2 * self.pairs))}
        by_bin = {k: correct[(dist >= lo) & (dist <= hi)].mean().item() for k, (lo, hi) in bins.items()}
        n_bin = {k: int(((dist >= lo) & (dist <= hi)).sum()) for k, (lo, hi) in bins.items()}
        by_dist = {int(d): correct[dist == d].mean().item() for d in dist.unique()}
        wm = model.blocks[0].attn.window if hasattr(model.blocks[0].attn, "window") else None
        inside = dist <= wm if wm is not None else torch.ones_like(dist, dtype=torch.bool)
        return {
            "test_accuracy": correct.mean().item(),
            "model_window": wm,
            "accuracy_inside_window": correct[inside].mean().item() if inside.any() else float("nan"),
            "accuracy_outside_window": correct[~inside].mean().item() if (~inside).any() else float("nan"),
            "queries_inside_window": int(inside.sum()),
            "accuracy_by_distance_bin": by_bin,
            "queries_by_distance_bin": n_bin,
            "accuracy_by_distance": by_dist,
            "krause_window": w,
            "chance": 1 / self.n_values,
            "n_test_queries": int(keep.sum()),
        }


class Backcopy(Task):
    """Bigram-Backcopy with a BOS token (Guo et al., 2024): the task in which a first-token sink forms.

    Tokens 0..vocab−1, a fixed bigram table (:func:`data.bigram_table`, seed 0) and three trigger
    tokens; after a trigger the next token copies the one before it (:func:`data.backcopy_batch`).
    The model reads [BOS, x_0, …, x_{T−2}] and predicts every x_t. A query row is *active* when it
    must copy (its token is a trigger) and *dormant* otherwise: attention has nothing to add there,
    and a softmax head, whose weights must sum to one, can only do nothing by attending to a token
    with a small value — BOS, which is always there. Loss on every token; the held-out metrics
    separate the copy (accuracy) from the bigram (bits above the table's entropy).
    """

    name, batch_size, lr = "backcopy", 32, 3e-3
    vocab, triggers, window, top_k = 32, (0, 1, 2), 16, 8
    model_defaults = dict(
        model="causal_lm",
        vocab_size=vocab,
        seq_len=64,
        bos=vocab,
        d_model=64,
        n_heads=1,
        n_layers=1,
        mlp_ratio=4,
    )
    attentions = causal_attentions(window=window, top_k=top_k)
    steps, epochs = 100, 20  # 2000 steps by default
    weight_decay = 0.0

    def setup(self, subset=None):
        self.table = data.bigram_table(self.vocab)
        self.T = self.model_defaults["seq_len"]

    def _batch(self, n, g):
        return data.backcopy_batch(n, self.T, self.table, self.triggers, generator=g)

    def held_out(self, n: int | None = None) -> torch.Tensor:
        """``n`` (default 1024) held-out sequences (n, seq_len), the same every call (seed 12345)."""
        return self._batch(1024 if n is None else n, torch.Generator().manual_seed(12345))[0]

    def active_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(n, T) bool: query rows that must copy — the rows whose input token is a trigger."""
        trig = torch.zeros(self.vocab + 1, dtype=torch.bool)
        trig[list(self.triggers)] = True
        return trig[torch.cat([torch.full_like(x[:, :1], self.vocab), x[:, :-1]], 1)]

    def steps_per_epoch(self):
        return self.steps

    def batches(self, g):
        for _ in range(self.steps):
            yield self._batch(self.batch_size, g)[0]

    def loss(self, model, x):
        return F.cross_entropy(model(x).reshape(-1, model.vocab_size), x.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model):
        x = self.held_out()
        logp = model(x).log_softmax(-1)
        copy = self.active_rows(x)
        nll = -logp.gather(-1, x[..., None])[..., 0]
        p = self.table[x[:, :-1]]  # bigram rows of the plain positions' previous tokens
        h = -(p * p.clamp_min(1e-30).log()).sum(-1)  # the table's entropy there: the best possible loss
        plain = ~copy[:, 1:]
        return {
            "copy_accuracy": (logp.argmax(-1) == x)[copy].float().mean().item(),
            "bigram_bits": nll[:, 1:][plain].mean().item() / LN2,
            "bigram_bits_optimal": h[plain].mean().item() / LN2,
            "test_bits_per_token": nll.mean().item() / LN2,
            "n_copy_positions": int(copy.sum()),
            "n_test_sequences": len(x),
        }


TASKS = {t.name: t for t in (DigitsViT, DigitsAR, TextLM, TextBOS, Recall, Backcopy)}


# --- building and training ---------------------------------------------------------------------
def build_model(config: dict) -> torch.nn.Module:
    """Instantiate the model described by a card's config."""
    config = dict(config)
    kind = config.pop("model")
    if kind == "vit":
        return ViT(**config)
    if kind == "causal_lm":
        return CausalLM(**config)
    raise ValueError(f"unknown model kind {kind!r}")


def train(
    task: str,
    attention: str | dict[str, Any] = "krause",
    *,
    epochs: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    subset: int | None = None,
    overrides: dict | None = None,
    lr: float | None = None,
    probe: Callable[[torch.nn.Module], dict[str, Any]] | None = None,
    probe_every: int = 100,
    log_every: int = 50,
    progress: bool = True,
    threads: int = 1,
) -> tuple[ViT | CausalLM, dict[str, Any]]:
    """Train `attention` (a name of the task's ``attentions`` or a spec dict) on `task`.

    ``epochs`` (default: the task's) or ``steps`` (total optimiser steps; the schedule spans them)
    set the budget; ``lr`` overrides the task's peak learning rate. ``probe(model) -> dict`` is
    evaluated (in eval mode, no grad) at step 0, every ``probe_every`` steps and at the end; the
    card keeps them as ``probes`` = [{"step": s, **probe(model)}, …] and the mean training loss of
    every ``log_every`` steps as ``train_loss_curve`` (with ``train_loss_steps``).
    Returns (model in eval mode, card dict without sha256).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {tuple(TASKS)}, got {task!r}")
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if steps is not None and (isinstance(steps, bool) or int(steps) != steps or steps < 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    for name, v in (("probe_every", probe_every), ("log_every", log_every)):
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    torch.set_num_threads(threads)
    t = TASKS[task]()
    t.setup(subset)
    config = t.config(attention, **(overrides or {}))
    label = attention if isinstance(attention, str) else "custom"
    lr = t.lr if lr is None else float(lr)
    per_epoch = t.steps_per_epoch()
    total = int(steps) if steps is not None else (epochs or t.epochs) * per_epoch
    epochs = math.ceil(total / per_epoch)
    torch.manual_seed(seed)
    model = build_model(config)
    model.config = config
    g = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=t.weight_decay)
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
        ),
    )
    from tqdm.auto import tqdm

    probes = []

    def run_probe(step):
        if probe is None:
            return
        model.eval()
        with torch.no_grad():
            probes.append(dict(step=step, **probe(model)))
        model.train()

    bar = tqdm(total=total, desc=f"{task}/{label}", disable=not progress, leave=False)
    history, curve, curve_steps, window = [], [], [], []
    t0, step = time.perf_counter(), 0
    run_probe(0)
    for _ in range(epochs):
        model.train()
        losses = []
        for batch in t.batches(g):
            if step == total:
                break
            loss = t.loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
            window.append(losses[-1])
            if len(window) == log_every:
                curve.append(sum(window) / log_every)
                curve_steps.append(step)
                window = []
            if step % probe_every == 0 and step < total:
                run_probe(step)
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        history.append(sum(losses) / len(losses))
    bar.close()
    train_time = time.perf_counter() - t0
    run_probe(total)
    model.eval()
    t1 = time.perf_counter()
    metrics = t.evaluate(model)
    card = dict(
        task=task,
        attention=label,
        seed=seed,
        epochs=epochs,
        steps=total,
        batch_size=t.batch_size,
        lr=lr,
        subset=subset,
        config=config,
        metrics=metrics,
        train_loss_by_epoch=history,
        train_loss_curve=curve,
        train_loss_steps=curve_steps,
        train_time_s=round(train_time, 2),
        eval_time_s=round(time.perf_counter() - t1, 2),
        n_params=sum(p.numel() for p in model.parameters()),
        machine=dict(
            platform=platform.platform(),
            processor=platform.processor() or platform.machine(),
            torch_threads=torch.get_num_threads(),
            torch=torch.__version__,
            cpu_count=os.cpu_count(),
            load_average_at_end=round(os.getloadavg()[0], 2),
            python=platform.python_version(),
        ),
    )
    if probes:
        card["probes"] = probes
    return model, card
