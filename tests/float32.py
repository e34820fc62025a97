"""Float32 rounding bounds: where every numerical tolerance of the suite comes from.

Two float32 computations of one value differ by rounding, not by a fixed amount. Each
operation rounds to within eps32/2 of its magnitude (eps32 = 2**-23 ≈ 1.19e-7), so a sum
of n terms of magnitude about M carries an error of about eps32·M·sqrt(n) when the
roundings are independent. CPUs and libraries change *which* roundings happen: AVX-512
and AVX2 kernels block sums differently and fuse multiply-adds differently, onnxruntime
and torch use different kernels and fused ops, a batch changes a matmul's blocking. So a
comparison allows

    f32_tol(M, n, k) = k · eps32 · M · sqrt(n)

with M the magnitude of the values compared (max |reference|), n the longest reduction
behind them, and k = SAME_LIBRARY (2: one library, only the summation order may differ)
or CROSS_LIBRARY (4: torch against onnxruntime, different kernels and fusions as well).
Each call site names its M and n in a comment. Measured on Intel AVX-512 and with torch
forced to AVX2 (ATEN_CPU_CAPABILITY=avx2, MKL/oneDNN capped at AVX2), the observed
differences stay below a quarter of these bounds.
"""

from __future__ import annotations

import math

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23
SAME_LIBRARY = 2
CROSS_LIBRARY = 4


def f32_tol(magnitude: float, n: int = 1, k: float = SAME_LIBRARY) -> float:
    """k · eps32 · magnitude · sqrt(n): the absolute tolerance for float32 results of that
    magnitude that went through reductions of length n (see the module docstring)."""
    return k * EPS32 * float(magnitude) * math.sqrt(n)


def peak(array) -> float:
    """max |array| (numpy or torch): the magnitude M of a reference."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return float(np.abs(np.asarray(array, dtype=np.float64)).max())


def vae_score_tol(scores, beta: float = 16.5, latent_dim: int = 64, features: int = 256,
                  k: float = CROSS_LIBRARY) -> float:
    """Tolerance for TaskVAE scores, mean((f − f̂)²) + β/2·Σ(μ² + e^lv − 1 − lv).

    The KL sum cancels: its latent_dim terms are each about 1 (e^lv ≈ 1 for the small
    log-variances of a VAE) before ``− 1`` removes most of it, so its rounding is
    eps32·(β/2)·sqrt(latent_dim) whatever the score; the reconstruction mean adds
    eps32·|score|·sqrt(features). Both carry the encoder MLP's rounding, hence k.
    """
    return k * EPS32 * (beta / 2 * math.sqrt(latent_dim) + peak(scores) * math.sqrt(features))
