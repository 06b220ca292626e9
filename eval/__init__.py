"""Robustness evaluation: attacks, randomized-smoothing certification and reports."""
