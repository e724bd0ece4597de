"""torch backend of :func:`particles.simulate`: whole ensembles as batched tensors, on the CPU or a GPU.

``simulate(..., backend="torch", device=None | "cpu" | "cuda")`` calls :func:`trajectory`. The state
of all S samples is one (S, n, d) tensor and every velocity evaluation is batched over S:

* dense normalised softmax / rbf, optionally causal (no radius, window or top-k):
  ``torch.nn.functional.scaled_dot_product_attention`` (flash attention on CPU and GPU) with scale β,
  or for rbf scale 1/σ² and the additive key bias −‖k_j‖²/(2σ²) (−‖q − k‖²/(2σ²) = ⟨q, k⟩/σ²
  − ‖k‖²/(2σ²) − ‖q‖²/(2σ²), and the last term cancels in the softmax); causal softmax uses
  ``is_causal``, causal rbf a float mask.
* everything else (radius, window, top-k, usa, the flat HK score): query rows in chunks of at most
  CHUNK scored pairs per sample-batch; each row scores its candidate keys — all n keys, or the
  2w − 1 (causal: w) keys of its window gathered by index, so windows cost O(n·w) — masks the
  radius (‖x_i − x_j‖² ≤ radius_bound_sq, the documented tolerance) and causality with −inf, keeps
  the top-k exactly (threshold = k-th largest score, ties to the smaller key j, as the reference),
  then softmax (or exp(s)/n for usa) and Σ_j a_ij V x_j.

Integrators are particles.integrate's "euler" and "rk4" (stage points retracted), which work on
tensors through the geometry objects; noise > 0 is Euler–Maruyama with the counter-based normals of
particles.kernels.noise (drawn on the CPU for each sample's key and step, then moved to the device),
so a seed gives the same noise as the numba backend.

Agreement with the numpy reference (tests/test_torch_backend.py): float64 within 1e-10 per velocity
evaluation and along trajectories; float32 within 1e-4 (SDPA's and the BLAS's float32 sums).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..geometry import get_geometry
from ..integrate import INTEGRATORS
from ..interaction import Interaction, radius_bound_sq
from ..kernels.noise import normals

CHUNK = 1 << 24  # scores (× d for the difference tensors) per chunk of query rows, all samples together
DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


def resolve_device(device) -> torch.device:
    """None → cpu; "cuda" needs a visible GPU (a clear error otherwise)."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be None, 'cpu' or 'cuda', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be None, 'cpu' or 'cuda', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no GPU (torch.cuda.is_available() is False)")
    return dev


class TorchField:
    """v(x) for a batch of states x (S, n, d) as a tensor; ``path`` is "sdpa" or "rows"."""

    def __init__(self, it: Interaction, n: int, d: int, dtype, device):
        self.it, self.n, self.d = it, n, d
        self.dtype, self.device = dtype, device
        it.check_dimension(d)
        npdt = {torch.float32: np.float32, torch.float64: np.float64}[dtype]
        self.Q, self.K, self.V = (None if m is None else torch.tensor(np.array(m, npdt), device=device)
                                  for m in (it.Q, it.K, it.V))
        self.inv2s2 = 1.0 / (2.0 * it.sigma**2)
        self.r2 = radius_bound_sq(it.radius, npdt) if it.radius is not None else None
        self.path = ("sdpa" if it.normalise and it.score != "flat" and it.radius is None and it.window is None
                     and it.top_k is None else "rows")
        if it.window is not None:  # key offsets j − i of a window: i−w+1..i (causal) or i−w+1..i+w−1
            hi = 1 if it.causal else it.window
            self.offsets = torch.arange(1 - it.window, hi, device=device)

    def _project(self, x):
        return tuple(x if M is None else x @ M.T for M in (self.Q, self.K, self.V))

    def __call__(self, x):
        q, k, v = self._project(x)
        if self.path == "sdpa":
            return self._sdpa(q, k, v)
        out = torch.empty_like(v)
        for a, b in self._chunks(x.shape[0]):
            w, idx = self._chunk_weights(x, q, k, a, b)
            out[:, a:b] = w @ v if idx is None else torch.einsum("scm,scmd->scd", w, v[:, idx])
        return out

    def weights(self, x):
        """Dense a_ij (S, n, n), zero outside the support."""
        q, k, _ = self._project(x)
        S, n = x.shape[0], self.n
        out = torch.zeros((S, n, n), dtype=x.dtype, device=x.device)
        for a, b in self._chunks(S):
            w, idx = self._chunk_weights(x, q, k, a, b)
            if idx is None:
                out[:, a:b] = w
            else:  # out-of-range window slots carry weight 0 and land on a clamped, valid key
                out[:, a:b].scatter_add_(2, idx.expand(S, -1, -1), w)
        return out

    def _sdpa(self, q, k, v):
        """SDPA on (S, 1, n, d): with 2-D/3-D inputs torch takes its unfused math path (4-6× slower)."""
        it, n = self.it, self.n
        q, k, v = q[:, None], k[:, None], v[:, None]
        if it.score == "softmax":
            return F.scaled_dot_product_attention(q, k, v, scale=it.beta, is_causal=bool(it.causal))[:, 0]
        mask = (-self.inv2s2 * (k * k).sum(-1))[..., None, :]  # (S, 1, 1, n): the key bias of every row
        if it.causal:
            above = torch.ones((n, n), dtype=torch.bool, device=q.device).triu(1)
            mask = mask.masked_fill(above, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=2.0 * self.inv2s2)[:, 0]

    def _chunks(self, S):
        m = self.n if self.it.window is None else len(self.offsets)
        rows = max(1, CHUNK // (S * m * (self.d if self.it.radius is not None or self.it.window else 1)))
        return [(a, min(self.n, a + rows)) for a in range(0, self.n, rows)]

    def _chunk_weights(self, x, q, k, a, b):
        """Weights of query rows a..b−1 over their candidate keys: (S, c, m) and the key index (c, m)
        of a window (None: the m = n keys in order)."""
        it, n = self.it, self.n
        rows = torch.arange(a, b, device=x.device)[:, None]
        qc = q[:, a:b]
        if it.window is None:
            idx, keys = None, torch.arange(n, device=x.device)[None, :]
            valid = torch.ones((b - a, n), dtype=torch.bool, device=x.device)
            kc = k
        else:
            keys = rows + self.offsets[None, :]
            valid = (keys >= 0) & (keys < n)
            idx = keys.clamp(0, n - 1)
            kc = k[:, idx]  # (S, c, m, d)
        if it.causal:
            valid = valid & (keys <= rows)
        if it.score == "flat":
            s = torch.zeros((q.shape[0],) + valid.shape, dtype=q.dtype, device=q.device)
        elif idx is None:
            s = qc @ kc.transpose(-1, -2)
            if it.score == "rbf":  # −‖q − k‖²/(2σ²) up to the row constant −‖q‖²/(2σ²), restored below
                s = 2.0 * self.inv2s2 * s - self.inv2s2 * (kc * kc).sum(-1)[:, None, :]
        elif it.score == "softmax":
            s = torch.einsum("scd,scmd->scm", qc, kc)
        else:
            s = -self.inv2s2 * ((qc[:, :, None, :] - kc) ** 2).sum(-1)
        if it.score == "softmax":
            s = it.beta * s
        elif it.score == "rbf" and idx is None:
            s = s - self.inv2s2 * (qc * qc).sum(-1)[..., None]
        valid = valid.expand(s.shape)
        if self.r2 is not None:
            xk = x[:, None, :, :] if idx is None else x[:, idx]
            valid = valid & (((x[:, a:b, None, :] - xk) ** 2).sum(-1) <= self.r2)
        s = s.masked_fill(~valid, float("-inf"))
        if it.top_k is not None and it.top_k < s.shape[-1]:
            s = s.masked_fill(~top_k_mask(s, it.top_k), float("-inf"))
        if it.normalise:
            return torch.softmax(s, dim=-1), idx
        return torch.exp(s) / n, idx


def top_k_mask(s, k):
    """The k largest entries of each row of s (last axis), ties to the smaller index (as a stable
    descending sort): everything above the k-th largest value, then its first equal entries."""
    thr = torch.topk(s, k, dim=-1).values[..., -1:]
    above = s > thr
    equal = s == thr
    room = k - above.sum(-1, keepdim=True)
    return above | (equal & (torch.cumsum(equal, dim=-1) <= room))


def trajectory(interaction, x0, *, keep, dt, integrator="euler", noise=0.0, noise_seed=None,
               geometry=None, device=None, return_weights=False):
    """Integrate S samples at once; returns (traj (S, T, n, d), weights (S, T, n, n) or None) as numpy.

    x0: (S, n, d) numpy in the run's dtype; keep: the saved step numbers (0 first); integrator:
    "euler" or "rk4"; noise > 0: Euler–Maruyama with the normals of sample s drawn from
    noise_seed[s] (its key, particles.kernels.noise) at each step; geometry: a name or a
    particles.geometry object (default: the interaction's).
    """
    if not isinstance(interaction, Interaction):
        raise TypeError(f"interaction must be an Interaction, got {type(interaction).__name__}")
    x0 = np.asarray(x0)
    if x0.ndim != 3 or x0.dtype not in DTYPES:
        raise ValueError(f"x0 must be a float32/float64 array (sample, n, d), got {x0.dtype} {x0.shape}")
    if integrator not in ("euler", "rk4"):
        raise ValueError(f"integrator must be 'euler' or 'rk4' on backend='torch', got {integrator!r}")
    if noise > 0 and integrator != "euler":
        raise ValueError("integrator must be 'euler' when noise > 0 (Euler–Maruyama)")
    keys = None if noise == 0 else np.asarray(noise_seed, dtype=np.uint64).reshape(-1)
    if keys is not None and len(keys) != x0.shape[0]:
        raise ValueError(f"noise_seed must hold one key per sample ({x0.shape[0]}), got {len(keys)}")
    keep = np.asarray(keep, dtype=np.int64)
    dev = resolve_device(device)
    geo = get_geometry(interaction.geometry if geometry is None else geometry)
    S, n, d = x0.shape
    field = TorchField(interaction, n, d, DTYPES[x0.dtype], dev)
    step = INTEGRATORS[integrator]
    sqrt_dt = float(np.sqrt(dt)) * noise

    def f(y):
        return geo.tangent(y, field(y))

    traj = np.empty((S, len(keep), n, d), dtype=x0.dtype)
    weights = np.empty((S, len(keep), n, n), dtype=x0.dtype) if return_weights else None
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(x0)).to(dev)
        done = 0
        for slot, target in enumerate(keep):
            for index in range(done, int(target)):
                if keys is None:
                    x = step(f, x, dt, geo)
                else:
                    xi = torch.from_numpy(np.stack([normals(key, index, (n, d), x0.dtype) for key in keys]))
                    xi = geo.project(x, xi.to(dev))  # T_x ξ
                    x = geo.retract(x + dt * f(x) + sqrt_dt * xi)
            done = int(target)
            traj[:, slot] = x.cpu().numpy()
            if return_weights:
                weights[:, slot] = field.weights(x).cpu().numpy()
            if not np.all(np.isfinite(traj[:, slot])):
                traj[:, slot:] = np.nan  # simulate's check names the cause (usa overflow, too large a dt)
                break
    return traj, weights
