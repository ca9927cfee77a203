"""The model zoo: a small MoE transformer LM, its training loop and the demo (not installed)."""
