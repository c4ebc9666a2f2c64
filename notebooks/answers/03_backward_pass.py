"""Answers to notebook 3's exercises (for instructors; attendees: try first).

Each `# %% name` cell replaces the notebook's exercise cell that defines `name`
(`python notebooks/workshop.py solve`). A cell imports what it uses.
"""

# %% my_rmsnorm_backward
def my_rmsnorm_backward(dout, x, weight, rstd):
    """Gradients of out = x * rstd * weight. With g = dout * weight (the gradient w.r.t.
    xhat = x * r):

    d xhat_i / d x_j = r * delta_ij + x_i * dr/dx_j = r * delta_ij - r**3 * x_i * x_j / C
                     = r * (delta_ij - xhat_i * xhat_j / C), so
    dx_j = sum_i g_i * d xhat_i / d x_j = r * (g_j - xhat_j * mean_i(g_i * xhat_i)).
    """
    C = x.shape[-1]
    xhat = x * rstd                                      # (N, C)
    dweight = (dout * xhat).reshape(-1, C).sum(axis=0)   # (C,)
    g = dout * weight                                    # (N, C)
    dx = rstd * (g - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    return dx, dweight


# %% my_swiglu_backward
from albor import xp


def my_swiglu_backward(dh, gate, up):
    """Gradients of h = silu(gate) * up, silu(g) = g * sigmoid(g): (dgate, dup)."""
    sig = 1.0 / (1.0 + xp.exp(-gate))
    silu = gate * sig
    dup = dh * silu
    dgate = dh * up * (sig + silu * (1.0 - sig))         # d silu/dg = sig + g * sig * (1 - sig)
    return dgate, dup
