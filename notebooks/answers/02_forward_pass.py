"""Answers to notebook 2's exercises (for instructors; attendees: try first).

Each `# %% name` cell replaces the notebook's exercise cell that defines `name`
(`python notebooks/workshop.py solve`). A cell imports what it uses.
"""

# %% my_rmsnorm
from albor import xp


def my_rmsnorm(x, weight, eps):
    """x (N, C) divided by the root mean square of its row, times weight (C,)."""
    mean_square = (x * x).mean(axis=-1, keepdims=True)   # (N, 1)
    return x / xp.sqrt(mean_square + eps) * weight      # (N, C)


# %% my_attention
import math

from albor import xp


def my_attention(q, k, v):
    """Causal softmax attention; q, k, v (B, H, T, D) -> (B, H, T, D)."""
    T, D = q.shape[-2:]
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(D)        # (B, H, T, T): [query t, key s]
    future = xp.arange(T)[None, :] > xp.arange(T)[:, None]     # (T, T): key s after query t
    scores = xp.where(future, -xp.inf, scores)                 # exp(-inf) = 0: no weight
    probs = xp.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)                 # softmax over the keys
    return probs @ v                                           # (B, H, T, D)
