"""Benchmarks: each prints its settings, figures and ratios from one run."""
