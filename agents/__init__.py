"""Backpropagation-based policy optimisation (BPO) and a model-free baseline.

Not built yet.
"""
