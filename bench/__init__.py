"""Benchmarks of rmt-kernels: ``python -m bench`` (what ``make bench`` runs)."""
