"""Offline data sets with fixed, documented splits.

* digits: scikit-learn ``load_digits`` (1797 images 8×8, values 0–16), split with
  ``train_test_split(test_size=0.25, random_state=0, stratify=y)`` → 1347 train / 450 test.
  The pixel model uses the same split, each pixel value 0–16 as one of 17 tokens (64 per image).
* text: the standard library's documentation topics ``pydoc_data.topics.topics``, concatenated in
  sorted key order with blank lines; characters outside '\\n' + ASCII 32–126 map to token 0 (unknown).
  The first 90 % of the characters are the training split, the last 10 % the held-out split.
* recall: synthetic associative recall (see :func:`recall_batch`).
* backcopy: the Bigram-Backcopy sequences of Guo et al. (2024) (see :func:`backcopy_batch`).
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
    return (
        torch.from_numpy(Xtr),
        torch.from_numpy(Xte),
        torch.from_numpy(ytr).long(),
        torch.from_numpy(yte).long(),
    )


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


def recall_batch(
    n: int, *, pairs: int = 32, n_keys: int = 16, n_values: int = 16, generator: torch.Generator | None = None
):
    """Multi-query associative recall: [k_0 v_0 k_1 v_1 … k_{m−1} v_{m−1}] with keys drawn uniformly
    from tokens 0..n_keys−1 (so keys repeat) and, per sequence, a random key → value map onto tokens
    n_keys..n_keys+n_values−1. Whenever a key has occurred before, its value is determined: the model
    reading k_t must predict v_t. Returns (tokens (n, 2m), targets (n, 2m), distances (n, 2m)):
    targets[:, 2t] = v_t at repeated keys and −100 elsewhere (ignored); distance = position of k_t
    minus position of the key's previous occurrence (its value token lies at distance − 1), 0 elsewhere."""
    keys = torch.randint(n_keys, (n, pairs), generator=generator)
    table = n_keys + torch.randint(n_values, (n, n_keys), generator=generator)
    values = table.gather(1, keys)
    seq = torch.stack([keys, values], 2).reshape(n, 2 * pairs)
    t = torch.arange(pairs)
    same = (keys[:, :, None] == keys[:, None, :]) & (t[None, None, :] < t[None, :, None])  # earlier, same key
    last = torch.where(same, t[None, None, :], -1).amax(2)  # previous occurrence (−1: none)
    seen = last >= 0
    targets = torch.full((n, 2 * pairs), -100, dtype=torch.long)
    dist = torch.zeros((n, 2 * pairs), dtype=torch.long)
    targets[:, 0::2] = torch.where(seen, values, -100)
    dist[:, 0::2] = torch.where(seen, 2 * (t - last), 0)
    return seq, targets, dist


def bigram_table(vocab: int, *, concentration: float = 0.5, seed: int = 0) -> torch.Tensor:
    """A fixed random bigram transition matrix P (vocab, vocab), rows ~ Dirichlet(concentration)."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.dirichlet(np.full(vocab, concentration), size=vocab)).float()


def backcopy_batch(
    n: int, length: int, table: torch.Tensor, triggers, *, generator: torch.Generator | None = None
):
    """Bigram-Backcopy (Guo et al., 2024, "Active-dormant attention heads"): sequences (n, length) in
    which x_{t+1} = x_{t−1} after a trigger token x_t ∈ ``triggers`` (the copy: a job for attention)
    and x_{t+1} ~ P[x_t] otherwise (the bigram: an MLP's job, attention has nothing to do there).
    x_0 is uniform over the non-trigger tokens. Returns (tokens (n, length), is_copy (n, length)):
    is_copy[:, t] marks the positions whose token was copied (determined by x_{t−2})."""
    vocab = table.shape[0]
    trig = torch.zeros(vocab, dtype=torch.bool)
    trig[list(triggers)] = True
    plain = (~trig).nonzero().squeeze(1)
    x = torch.empty((n, length), dtype=torch.long)
    copy = torch.zeros((n, length), dtype=torch.bool)
    x[:, 0] = plain[torch.randint(len(plain), (n,), generator=generator)]
    for t in range(1, length):
        drawn = torch.multinomial(table[x[:, t - 1]], 1, generator=generator).squeeze(1)
        copy[:, t] = trig[x[:, t - 1]] & (t >= 2)
        x[:, t] = torch.where(copy[:, t], x[:, t - 2], drawn)
    return x, copy
