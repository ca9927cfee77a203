"""Benchmarks of `jax_ccfuser.fused_moe` against the all-to-all baselines and a dense roof.

`python -m bench.run` measures and writes records to `bench/results/`; `python -m bench.report`
turns the records into plots and the README table; `bench.model` is the analytic multi-GPU model.
"""
