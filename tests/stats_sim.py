"""A generator of simulated battle evidence: per-seed, per-example correctness of two architectures.

Each example i has a difficulty logit ``u_i ~ N(mu, s_ex)``; each seed s a shift ``v_s ~ N(0, s_seed)``;
each (seed, example) an interaction ``e_si ~ N(0, s_int)``; a run is correct on an example with
probability ``sigmoid(u_i + v_s + e_si)``. Architecture B sees the same examples with logits
``u_i + shift + w_i``, ``w_i ~ N(0, s_arch)`` (its own per-example strengths). An A/A study has
``shift = s_arch = 0``: the same architecture, independent seeds. The defaults give about 80% accuracy
and a seed-to-seed spread of about 0.5 point of accuracy on 1,000 examples.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Population:
    """The generator's parameters (logit units)."""

    mu: float = 10.0
    s_ex: float = 12.0
    s_seed: float = 0.05
    s_int: float = 0.5
    shift: float = 0.0
    s_arch: float = 0.0


def _expit(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def studies(rng: np.random.Generator, count: int, n_a: int, n_b: int, m: int,
            pop: Population = Population(), chunk: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """``count`` independent studies: bool arrays a (count, n_a, m) and b (count, n_b, m).

    Drawn ``chunk`` studies at a time in float32, so the temporaries stay small.
    """
    a = np.empty((count, n_a, m), dtype=bool)
    b = np.empty((count, n_b, m), dtype=bool)
    f32 = np.float32

    def runs(logit: np.ndarray, n: int) -> np.ndarray:
        k = logit.shape[0]
        seed_shift = pop.s_seed * rng.standard_normal((k, n, 1), dtype=f32)
        noise = pop.s_int * rng.standard_normal((k, n, m), dtype=f32)
        return rng.random((k, n, m), dtype=f32) < _expit(logit + seed_shift + noise)

    for start in range(0, count, chunk):
        k = min(chunk, count - start)
        u = pop.mu + pop.s_ex * rng.standard_normal((k, 1, m), dtype=f32)
        u_b = u + pop.shift
        if pop.s_arch:
            u_b = u_b + pop.s_arch * rng.standard_normal((k, 1, m), dtype=f32)
        a[start:start + k] = runs(u, n_a)
        b[start:start + k] = runs(u_b, n_b)
    return a, b


def shift_for(points: float, pop: Population = Population()) -> float:
    """The logit shift of B that raises its expected accuracy by ``points`` (by quadrature over u)."""
    z = np.linspace(-6, 6, 2001)
    weight = np.exp(-z**2 / 2)
    weight /= weight.sum()
    spread = pop.s_seed**2 + pop.s_int**2  # u + v + e is normal; B adds w

    def accuracy(c: float, var: float) -> float:
        return float(np.sum(weight * _expit(pop.mu + c + np.sqrt(var) * z)))

    base, lo, hi = accuracy(0.0, pop.s_ex**2 + spread), -5.0, 5.0
    for _ in range(60):
        mid = (lo + hi) / 2
        gain = accuracy(mid, pop.s_ex**2 + pop.s_arch**2 + spread) - base
        lo, hi = (mid, hi) if gain < points / 100 else (lo, mid)
    return (lo + hi) / 2
