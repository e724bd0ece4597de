"""LoRA fine-tuning of SmolLM2-135M on CPU: the Krause arm (krausified) and its matched control.

Both arms share everything but the attention: the same base model, the same LoRA (``llm.LORA``), the
same training windows in the same order (drawn from the seed), the same optimiser and schedule:
AdamW (lr 2e-4, weight decay 0.01), linear warm-up over the first 10 % of the steps then cosine decay
to 0, gradient clipping at 1.0, batches of 4 windows of 256 tokens (``[BOS] + 255`` tokens of the
training split at uniformly drawn offsets). The official recipe (lr 5e-5, 2 epochs of 50 k
instruction examples, effective batch 32) is sized for an 8B model on GPUs; on 2 CPU cores a run has a
few hundred steps, hence the larger LoRA learning rate.

A run writes ``work/NAME/log.jsonl`` (one line per logged step) and, every ``save_every`` steps, a
resumable state ``work/NAME/state.pt`` (adapters, optimiser, scheduler, RNG); when it ends,
``out/NAME.pt`` + ``out/NAME.json`` (the adapter checkpoint and its card, with the held-out loss of
the float16 adapters it ships). A run whose checkpoint exists is skipped; a stopped run resumes.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from . import llm

DEFAULTS = dict(steps=200, batch=4, seq_len=256, lr=2e-4, weight_decay=0.01, warmup=0.1, clip=1.0)


def run_name(attention: str, seed: int) -> str:
    return f"smollm2-{attention}-s{seed}"


def schedule(step: int, steps: int, warmup: float) -> float:
    """Learning-rate factor: linear warm-up to 1 over ``warmup·steps`` steps, then cosine to 0."""
    w = max(1, int(round(warmup * steps)))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w)))


def offsets(n_tokens: int, steps: int, batch: int, T: int, seed: int) -> np.ndarray:
    """(steps, batch) window offsets into the training stream, uniform, fixed by the seed."""
    return np.random.default_rng(seed).integers(0, n_tokens - (T - 1) + 1, size=(steps, batch))


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _mean_gate(model) -> float | None:
    """Mean softmax share g_0 = softmax(b)_0 of the gate biases (a cheap drift indicator)."""
    vals = [
        torch.softmax(m.gate.bias.detach(), 0)[0].item()
        for m in model.modules()
        if getattr(m, "kind", "") == "hybrid"
    ]
    return float(np.mean(vals)) if vals else None


def train_smollm2(
    attention: str = "krause",
    seed: int = 0,
    *,
    steps: int = DEFAULTS["steps"],
    out="checkpoints",
    work="runs/llm",
    threads: int | None = None,
    log_every: int = 5,
    save_every: int = 25,
    progress: bool = True,
    force: bool = False,
    heldout_windows: int | None = None,
    attn_implementation: str = "sdpa",
    dropout_masks: str = "numpy",
) -> dict:
    """Fine-tune one arm (``attention`` = "krause" | "softmax") with ``seed``; returns the card.

    The softmax attention (the control's, the hybrid's softmax branch) runs as ``attn_implementation``:
    "sdpa" (default; 1.8x faster per step than "eager" on CPU, the same function) during training.
    ``dropout_masks``: "numpy" (default: :class:`llm.DropoutMasks`, seeded by ``seed``) or "torch"
    (torch's own dropout, the recipe of the earlier adapters in the git history; a 2-thread step
    1.25x (control) to 1.7x (Krause) slower, benchmarks/llm_dropout.json)."""
    if attention not in ("krause", "softmax"):
        raise ValueError(f"attention must be 'krause' or 'softmax', got {attention!r}")
    if dropout_masks not in ("numpy", "torch"):
        raise ValueError(f"dropout_masks must be 'numpy' or 'torch', got {dropout_masks!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    name = run_name(attention, seed)
    out, work = Path(out), Path(work) / name
    ck = out / f"{name}.json"
    if ck.exists() and (out / f"{name}.pt").exists() and not force:
        return json.loads(ck.read_text())
    if threads:
        torch.set_num_threads(int(threads))
    cfg = dict(DEFAULTS, steps=steps)
    B, T = cfg["batch"], cfg["seq_len"]
    torch.manual_seed(seed)
    t_load = time.perf_counter()
    model, tok = llm.build(attention, base=llm.load_base(attn_implementation))
    masks = llm.use_numpy_dropout(model, seed) if dropout_masks == "numpy" else None
    data = llm.corpus(tok)
    bos = tok.bos_token_id
    plan = offsets(len(data["train"]), steps, B, T, seed)
    params = _trainable(model)
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, steps, cfg["warmup"]))
    work.mkdir(parents=True, exist_ok=True)
    state_path, log_path = work / "state.pt", work / "log.jsonl"
    start, elapsed = 0, 0.0
    if state_path.exists() and not force:
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        if st["plan_sha"] != _sha(plan):
            raise RuntimeError(f"{state_path} belongs to another run plan; remove it or pass force=True")
        named = dict(model.named_parameters())
        with torch.no_grad():
            for n, v in st["adapters"].items():
                named[n].copy_(v)
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["rng"])
        if bool(st.get("dropout_masks")) != (masks is not None):
            raise RuntimeError(
                f"{state_path} was saved with other dropout masks; pass dropout_masks= to match"
            )
        if masks is not None:
            masks.restore(st["dropout_masks"])
        start, elapsed = int(st["step"]), float(st["elapsed"])
    load_s = time.perf_counter() - t_load
    model.train()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc=name, unit="step")
    losses = []
    with open(log_path, "a") as log:
        for step in range(start, steps):
            t0 = time.perf_counter()
            x = llm.windows(data["train"], T, bos, plan[step])
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg["clip"]))
            opt.step()
            sched.step()
            dt = time.perf_counter() - t0
            elapsed += dt
            losses.append(float(loss))
            if step % log_every == 0 or step == steps - 1:
                rec = dict(step=step, loss=float(loss), grad_norm=gnorm, lr=sched.get_last_lr()[0], sec=dt)
                if attention == "krause":
                    rec["gate_bias_softmax_share"] = _mean_gate(model)
                log.write(json.dumps(rec) + "\n")
                log.flush()
            if (step + 1) % save_every == 0 and step + 1 < steps:
                _save_state(state_path, model, opt, sched, step + 1, elapsed, plan, masks)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss):.3f}")
    if bar is not None:
        bar.close()
    # ship float16 adapters; the card's held-out loss is that of the shipped (rounded) adapters
    shipped = set(llm.adapter_names(model))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in shipped:
                p.copy_(p.half().float())
    held = llm.windows(data["heldout"], T, bos)
    if heldout_windows:
        held = held[:heldout_windows]
    t_eval = time.perf_counter()
    h_loss = llm.heldout_loss(model, held)
    card = dict(
        task="smollm2-lm",
        attention=attention,
        seed=seed,
        base=llm.base_identity(),
        krausify=llm.KRAUSE if attention == "krause" else None,
        lora=llm.LORA,
        training=dict(
            cfg,
            optimizer="AdamW",
            schedule="linear warm-up then cosine to 0",
            threads=torch.get_num_threads(),
            attn_implementation=attn_implementation,
            dropout_masks=dropout_masks,
            steps_done=steps,
            train_seconds=round(elapsed, 1),
            sec_per_step=round(elapsed / max(1, steps), 3),
            load_seconds=round(load_s, 1),
            first_losses=[round(v, 4) for v in losses[:5]],
            last10_loss=round(float(np.mean(losses[-10:])), 4) if losses else None,
            host=platform.node(),
            loadavg=list(os.getloadavg()),
        ),
        data=data["info"],
        metrics=dict(
            heldout_windows=len(held),
            heldout_tokens_per_window=T,
            heldout_loss=round(h_loss, 5),
            heldout_ppl=round(math.exp(h_loss), 4),
            eval_seconds=round(time.perf_counter() - t_eval, 1),
        ),
        trainable_parameters=sum(p.numel() for p in _trainable(model)),
        adapter_parameters=sum(v.numel() for v in llm.adapter_state(model).values()),
    )
    card = llm.save_adapters(model, card, out / name)
    if state_path.exists():
        state_path.unlink()  # our own resumable state: the checkpoint supersedes it
    return card


def _sha(plan) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(plan).tobytes()).hexdigest()


def _save_state(path, model, opt, sched, step, elapsed, plan, masks=None):
    state = dict(
        dropout_masks=masks.state() if masks is not None else "",
        adapters=llm.adapter_state(model, dtype=torch.float32),
        optimizer=opt.state_dict(),
        scheduler=sched.state_dict(),
        rng=torch.get_rng_state(),
        step=step,
        elapsed=elapsed,
        plan_sha=_sha(plan),
    )
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def step_time(
    attention: str,
    *,
    steps: int = 3,
    threads: int = 1,
    attn_implementation: str = "eager",
    dropout_masks: str = "numpy",
) -> float:
    """Median seconds of one training step at 4 × 256 tokens (after one warm-up step)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base = llm.load_base(attn_implementation)
    model, tok = llm.build(attention, base=base)
    if dropout_masks == "numpy":
        llm.use_numpy_dropout(model, 0)
    params = _trainable(model)
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randint(3, tok.vocab_size, (4, 256))
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))
