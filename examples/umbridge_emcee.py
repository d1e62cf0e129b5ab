"""emcee samples UM-Bridge's `donut` benchmark from a live gradserve, through umbridge's own
emcee integration (`umbridge.emcee.UmbridgeLogProb`).

    gradserve serve --x64 --models service.models.benchmarks &
    python examples/umbridge_emcee.py http://127.0.0.1:8000

Each walker's log density is one UM-Bridge Evaluate; a thread pool sends a step's walkers at
once, and gradserve batches them into one vmapped computation. The donut's mass lies on the
circle of radius 2.6, so the chain's mean radius comes out close to it.
"""

from __future__ import annotations

import sys
from multiprocessing.pool import ThreadPool

import emcee
import numpy as np
from umbridge.emcee import UmbridgeLogProb


def sample(url: str, steps: int = 300, walkers: int = 8, seed: int = 0) -> np.ndarray:
    """`steps` emcee steps of `walkers` walkers; the chain after a burn-in of a third."""
    log_prob = UmbridgeLogProb(url, "donut")
    rng = np.random.default_rng(seed)
    start = rng.normal(size=(walkers, log_prob.ndim))
    with ThreadPool(8) as pool:
        sampler = emcee.EnsembleSampler(walkers, log_prob.ndim, log_prob, pool=pool)
        sampler.random_state = np.random.RandomState(seed).get_state()
        sampler.run_mcmc(start, steps)
    return sampler.get_chain(discard=steps // 3, flat=True)


def mean_radius(chain: np.ndarray) -> float:
    return float(np.mean(np.linalg.norm(chain, axis=1)))


if __name__ == "__main__":
    chain = sample(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000")
    print(f"{len(chain)} samples, mean radius {mean_radius(chain):.3f} (the donut's: 2.6)")
