"""Offline data sets with fixed, documented splits.

* digits: scikit-learn ``load_digits`` (1797 images 8×8, values 0–16), split with
  ``train_test_split(test_size=0.25, random_state=0, stratify=y)`` → 1347 train / 450 test.
  The pixel model uses the same split, each pixel value 0–16 as one of 17 tokens (64 per image).
* text: the standard library's documentation topics ``pydoc_data.topics.topics``, concatenated in
  sorted key order with blank lines; characters outside '\\n' + ASCII 32–126 map to token 0 (unknown).
  The first 90 % of the characters are the training split, the last 10 % the held-out split.
* recall: synthetic associative recall (see :func:`recall_batch`).
"""

from __future__ import annotations

import numpy as np
import torch

CHARS = "\x00\n" + "".join(chr(c) for c in range(32, 127))  # token 0 = unknown character
_INDEX = {c: i for i, c in enumerate(CHARS)}


def digits_split():
    """(X_train, X_test, y_train, y_test): float32 images (N, 8, 8) in 0–16 and int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    X = d.images.astype(np.float32)
    Xtr, Xte, ytr, yte = train_test_split(X, d.target, test_size=0.25, random_state=0, stratify=d.target)
    return (torch.from_numpy(Xtr), torch.from_numpy(Xte),
            torch.from_numpy(ytr).long(), torch.from_numpy(yte).long())


def digits_tokens():
    """(train, test) pixel tokens (N, 64), int64 in 0..16, raster order."""
    Xtr, Xte, _, _ = digits_split()
    return Xtr.reshape(-1, 64).long(), Xte.reshape(-1, 64).long()


def text_corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def encode(text: str) -> torch.Tensor:
    return torch.tensor([_INDEX.get(c, 0) for c in text], dtype=torch.long)


def decode(ids) -> str:
    return "".join("\ufffd" if i == 0 else CHARS[i] for i in ids.tolist())


def text_split(train_fraction: float = 0.9):
    """(train, test) character ids of the documentation-topics corpus."""
    ids = encode(text_corpus())
    cut = int(train_fraction * len(ids))
    return ids[:cut], ids[cut:]


def recall_batch(n: int, *, pairs: int = 32, n_keys: int = 64, n_values: int = 16,
                 generator: torch.Generator | None = None):
    """Associative recall: [k_0 v_0 k_1 v_1 … k_{m−1} v_{m−1} q] with distinct keys k (tokens
    0..n_keys−1), values v (tokens n_keys..n_keys+n_values−1), query q = k_j for j uniform; the answer
    is v_j. Returns (tokens (n, 2m+1), answers (n,), distances (n,)), distance = 2m − 2j = position
    of the query minus position of its key (2, 4, …, 2m)."""
    keys = torch.rand(n, n_keys, generator=generator).argsort(1)[:, :pairs]
    values = n_keys + torch.randint(n_values, (n, pairs), generator=generator)
    j = torch.randint(pairs, (n,), generator=generator)
    seq = torch.stack([keys, values], 2).reshape(n, 2 * pairs)
    rows = torch.arange(n)
    seq = torch.cat([seq, keys[rows, j][:, None]], 1)
    return seq, values[rows, j], 2 * pairs - 2 * j
