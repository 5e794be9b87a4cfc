"""Ablation sweeps and their side-by-side comparison."""
