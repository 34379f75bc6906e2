"""Offline jobs: training (classifiers, interventions, baselines), evaluation and benchmarks."""
