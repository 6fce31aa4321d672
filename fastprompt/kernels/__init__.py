"""Kernels (tier 1): numerics and launch configuration only; no autograd, no tests."""
