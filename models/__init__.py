"""The model zoo: a small MoE transformer LM, its training loop and the demo (run from the repo root)."""
