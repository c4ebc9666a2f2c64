"""Answers to notebook 5's exercises (for instructors; attendees: try first).

Each `# %% name` cell replaces the notebook's exercise cell that defines `name`
(`python notebooks/workshop.py solve`). A cell imports what it uses.
"""

# %% my_adamw_update
from albor import xp


def my_adamw_update(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay):
    """AdamW update number t (1, 2, ...) of one parameter: returns the new (p, m, v)."""
    p = p * (1 - lr * weight_decay)            # decoupled weight decay, on the old p
    m = beta1 * m + (1 - beta1) * g            # running mean of g
    v = beta2 * v + (1 - beta2) * g * g        # running mean of g**2
    m_hat = m / (1 - beta1 ** t)               # bias correction: m and v started at 0
    v_hat = v / (1 - beta2 ** t)
    p = p - lr * m_hat / (xp.sqrt(v_hat) + eps)
    return p, m, v


# %% my_lr_at
import math


def my_lr_at(step, max_steps, lr, warmup, min_lr):
    """Learning rate of update `step` (1-based): linear warmup, then cosine down to min_lr."""
    if step <= warmup:
        return lr * step / (warmup + 1)                       # never 0
    if step > max_steps:
        return min_lr
    progress = (step - warmup - 1) / max(1, max_steps - warmup - 1)   # 0 at the peak, 1 at the end
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * progress)) / 2
