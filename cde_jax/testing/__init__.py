"""What the tests and `scripts/benchmark.py` share: the PyTorch reference of both stages
(`torch_reference`, needs the `test` extra: torch and transformers)."""
