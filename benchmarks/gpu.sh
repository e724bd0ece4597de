#!/usr/bin/env bash
# GPU checks of the torch backend (issue 18), for a machine with a CUDA GPU whose python3 has torch,
# numba, numpy, scipy, xarray and pytest (no install: the repository is put on PYTHONPATH).
#   bash benchmarks/gpu.sh            # results under $OUT (the device tool's folder) or benchmarks/gpu-run/
# 1. tests/test_torch_backend.py -k gpu: the GPU trajectories against the CPU ones (fp64 1e-10, fp32 1e-3);
# 2. ksync bench --device cuda: one Euler step of the torch backend against the same step on SDPA on
#    the same GPU, dense softmax/rbf n = 1e4, 3e4, 1e5 (fp64 up to 3e4), d = 3..128, and windowed top-k
#    Krause at n = 1e5, 1e6. About 5 minutes on an H200; the whole script is capped at 9 minutes.
set -uo pipefail
PY=${PYTHON:-python3}  # the device image: python3 holds torch; here: PYTHON=.venv/bin/python
OUT=${OUT:-benchmarks/gpu-run}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NUMBA_CACHE_DIR=/tmp/numba-cache
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, numba, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0), 'numba', numba.__version__, 'numpy', numpy.__version__)"
} 2>&1 | tee "$OUT/env.txt"
timeout 180 $PY -m pytest -q -p no:cacheprovider tests/test_torch_backend.py -k gpu -rs 2>&1 | tee "$OUT/gpu-tests.txt"
timeout 360 $PY -c "import sys; from analysis.cli import main; sys.exit(main(sys.argv[1:]))" \
    bench --device cuda --repeats 3 --json "$OUT/gpu.json" --markdown "$OUT/gpu_table.md" 2>&1 | tee "$OUT/gpu-bench.txt"
