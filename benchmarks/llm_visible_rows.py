"""First-token weight on the rows that can see the first token (issue 15's control for the window).

The Krause branch (window 32) cannot attend to the first token from query 32 on, so its α₀ averaged
over all 128 queries is at most ~1/4 by construction. This measures, per layer and model, α₀ averaged
over the queries 1..window-1 only (they see [BOS] in both branches), from full attention maps of the
first N held-out windows: base, each shipped control and Krause adapter (mixture, softmax branch,
Krause branch), and krausify(base) before any fine-tuning. Writes benchmarks/llm_visible_rows.nc
and prints a table.

    python benchmarks/llm_visible_rows.py [--windows 16]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import xarray as xr


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--out", default=str(Path(__file__).with_name("llm_visible_rows.nc")))
    args = p.parse_args(argv)
    import analysis
    from analysis.bridge import attention_layers, extract
    from analysis.figures.llm import T, shipped_runs
    from particles.nn import llm, load_checkpoint
    from particles.nn.checkpoint import read_card

    base, tok = llm.load_base()
    held = llm.windows(llm.corpus(tok)["heldout"], T, tok.bos_token_id)[: args.windows]
    runs = shipped_runs()
    window = int(read_card(next(c for a, _, c in runs if a == "krause"))["krausify"]["window"])
    rows = slice(1, window)  # queries 1..window-1: [BOS] is inside every branch's support
    curves, labels = [], []
    # last: krausify(base) before any fine-tuning (the Krause branch is then a copy of the softmax one
    # with RBF scores, window and top-k): what the fine-tune changed
    for attention, seed, card in [("base", -1, None)] + runs + [("init", -1, None)]:
        if attention == "init":
            from particles.nn import krausify

            model = krausify(base, **read_card(runs[-1][2])["krausify"])
        else:
            model = base if card is None else load_checkpoint(card.with_suffix(".pt"))
        ds = extract(model, held, batch_size=4, progress=False)
        series = {"model": ds["attention"]}
        if "branch_attention" in ds:
            series = {
                "mixture": ds["attention"],
                **{f"{b} branch": ds["branch_attention"].sel(branch=b) for b in ("softmax", "krause")},
            }
        for name, att in series.items():
            a0 = analysis.first_token_mass(attention_layers(att), queries=rows)  # (sample, layer, head)
            curves.append(a0.mean(("sample", "head")).values)
            label = {"base": "base", "init": "krausify, no fine-tune"}.get(attention, f"{attention}-s{seed}")
            labels.append(f"{label}: {name}")
        del ds
    out = xr.Dataset(
        {"alpha0_visible_rows": (("series", "layer"), np.array(curves))},
        coords={"series": labels, "layer": np.arange(len(curves[0]))},
        attrs=dict(
            queries=f"1..{window - 1}",
            windows=args.windows,
            tokens_per_window=T,
            description="mean over windows, heads and the queries 1..window-1 of a_i0",
        ),
    )
    out.to_netcdf(args.out)
    head = "| series | layers 0-2 | layers 3-9 | layers 10-11 | layers 12-29 | all layers |"
    print(head + "\n|---|---|---|---|---|---|")
    for s in out.series.values:
        v = out.alpha0_visible_rows.sel(series=s).values
        print(
            f"| {s} | {v[:3].mean():.3f} | {v[3:10].mean():.3f} | {v[10:12].mean():.3f} | "
            f"{v[12:].mean():.3f} | {v.mean():.3f} |"
        )


if __name__ == "__main__":
    main()
