"""Benchmarks of the shared-cache engine against transformers baselines (`python -m benchmarks.run`)."""
