"""Budgets of the SmolLM2 experiments (issue 15), measured, not asserted: python benchmarks/llm_budget.py

* extraction of 64 held-out windows × 128 tokens with ``reduce=True`` (batches of 8), base model and
  krausified model: wall time, the process's peak resident memory (``ru_maxrss``, model included) and
  the ratio to a plain no-grad forward of the same windows through the same (eager) model, measured
  just before in the same process (on a loaded machine the ratio is the number to compare);
* one LoRA training step at 4 × 256 tokens for each arm (``--steps``; SDPA softmax, 1 and 2 threads),
  the median of 3 after a warm-up.

Writes benchmarks/llm_budget.json (with the load average: timings on a shared machine are noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path


def rss_peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def _extract_once(name: str, threads: int) -> dict:
    """In a fresh process: load SmolLM2 (krausified for "krause"), extract 64 × 128 with reduce=True."""
    import torch

    torch.set_num_threads(threads)
    from analysis.bridge import extract
    from particles.nn import krausify, llm

    model, tok = llm.load_base()
    held = llm.windows(llm.corpus(tok)["heldout"], 128, tok.bos_token_id)[:64]
    if name == "krause":
        krausify(model)
    loaded = rss_peak_gb()
    t0 = time.perf_counter()
    with torch.no_grad():  # the same windows through the bare model: what extraction adds to this
        for s in range(0, len(held), 8):
            model.model(input_ids=held[s : s + 8])
    forward = time.perf_counter() - t0
    t0 = time.perf_counter()
    ds = extract(model, held, reduce=True, batch_size=8, progress=False)
    seconds = time.perf_counter() - t0
    return dict(
        seconds=round(seconds, 2),
        plain_forward_seconds=round(forward, 2),
        ratio_to_plain_forward=round(seconds / forward, 3),
        peak_gb=round(rss_peak_gb(), 3),
        peak_after_load_gb=round(loaded, 3),
        dataset_mb=round(ds.nbytes / 1e6, 1),
        loadavg=list(os.getloadavg()),
    )


def extraction(threads: int) -> dict:
    """Each model in its own process, so that every peak is that model's alone."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        return {name: pool.apply(_extract_once, (name, threads)) for name in ("base", "krause")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", action="store_true", help="also time one training step per arm")
    p.add_argument("--json", default=str(Path(__file__).with_name("llm_budget.json")))
    args = p.parse_args(argv)
    res = dict(
        host=platform.node(),
        cpus=os.cpu_count(),
        threads=args.threads,
        loadavg_start=list(os.getloadavg()),
        extraction_64x128_reduce=extraction(args.threads),
    )
    if args.steps:
        from particles.nn.llm_train import step_time

        res["train_step_4x256_seconds"] = {  # 1 thread: two runs side by side; 2 threads: one run alone
            f"{arm}_{threads}thread": round(step_time(arm, threads=threads, attn_implementation="sdpa"), 2)
            for threads in (1, 2)
            for arm in ("softmax", "krause")
        }
    res["loadavg_end"] = list(os.getloadavg())
    Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
