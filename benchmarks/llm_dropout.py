"""Where the LoRA dropout masks come from, timed: python benchmarks/llm_dropout.py

One SmolLM2 LoRA training step at 4 × 256 tokens (SDPA softmax, 2 threads, median of 3 after a
warm-up, :func:`particles.nn.llm_train.step_time`) for each arm, with the dropout masks drawn by
numpy (``llm.DropoutMasks``, the default) and by torch's own dropout, in one process, one after the
other. Writes benchmarks/llm_dropout.json with the CPU and the load average of each measurement.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> int:
    from particles.nn.llm_train import step_time

    flags = next(
        ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")
    ).split()
    res = dict(
        cpu=cpu_model(),
        isa=[f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags],
        cpus=os.cpu_count(),
        threads=2,
        seconds_per_step={},
        loadavg={},
    )
    for arm in ("krause", "softmax"):
        for masks in ("numpy", "torch"):
            key = f"{arm}-{masks}"
            res["seconds_per_step"][key] = round(
                step_time(arm, steps=3, threads=2, attn_implementation="sdpa", dropout_masks=masks), 2
            )
            res["loadavg"][key] = os.getloadavg()[0]
            print(key, res["seconds_per_step"][key], flush=True)
    Path(__file__).with_name("llm_dropout.json").write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
