"""lad-jax: Learning Advantage Distributions (Li & Li, 2026) and RLVR baselines in JAX."""

__version__ = "0.1.0"
