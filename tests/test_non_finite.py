"""Non-finite values stay with the token that carries them."""

import functools
import pathlib
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ccfuser as ccf
from hardening_cases import (NON_FINITE, assert_non_finite_stays_in_its_rows,
                             assert_relu_nan_as_reference, forward_and_grads)
from moe_cases import Case, make_inputs, shard_ep

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("where,value", NON_FINITE)
def test_non_finite_token_stays_in_its_rows(where, value):
  assert_non_finite_stays_in_its_rows(forward_and_grads(ccf.fused_moe, 4),
                                      Case(devices=4, tokens=16, k=2, skew=0.5, seed=51),
                                      where, value)


def test_relu_passes_no_gradient_through_its_flat_side_even_a_nan():
  """The CPU handlers select where jax.nn.relu's gradient does: a multiply by relu'(h) = 0 would
  turn a NaN into NaN (NaN x 0)."""
  assert_relu_nan_as_reference(forward_and_grads(ccf.fused_moe, 4, "relu"),
                               forward_and_grads(ccf.reference_moe, 4, "relu"),
                               Case(devices=4, tokens=16, k=2, activation="relu", seed=53))


@pytest.mark.parametrize("residuals", ["inputs", "hidden"])
def test_debug_nans_finds_none_in_finite_layers(residuals):
  """jax_debug_nans reads every output of every primitive, the h rows the forward keeps for the
  backward among them: rows no tile wrote (the placeholder row where none are kept, those past
  a device's pairs) must hold zeros, not what the memory held before. Eagerly, each call runs
  on memory other calls just freed."""
  case = Case(devices=4, tokens=16, k=2, skew=0.5, seed=52)
  x, ids, weights, w_in, w_out = make_inputs(case)
  eager = shard_ep(functools.partial(ccf.fused_moe, residuals=residuals), case.devices)
  with jax.debug_nans(True):
    for layer in (eager, jax.jit(eager)):  # a jit's outputs: the kept rows under jax.vjp
      loss = lambda *args: jnp.sum(layer(*args) ** 2)
      for _ in range(2):
        grads = jax.grad(loss, (0, 2, 3, 4))(x, ids, weights, w_in, w_out)
        jax.vjp(layer, x, ids, weights, w_in, w_out)
        assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_activations_are_defined_at_every_value(tmp_path):
  """The CPU handlers' activations (common/activation.h's host arithmetic) with UBSan trapping:
  a NaN reaching Exp was converted to an integer, which C++ leaves undefined (x86 happened to
  give a NaN back); and every activation and derivative against its formula in double."""
  cxx = shutil.which("c++")
  if cxx is None:
    pytest.skip("needs a C++ compiler, as the build does")
  binary = tmp_path / "activation_values"
  # The build's flags (CMakeLists.txt), with UBSan.
  build = subprocess.run([cxx, "-std=c++17", "-O3", "-fno-trapping-math", "-march=x86-64-v2",
                          "-fsanitize=undefined,float-cast-overflow", "-fno-sanitize-recover=all",
                          f"-I{REPO}", "-o", str(binary),
                          str(REPO / "tests" / "activation_values.cc")],
                         capture_output=True, text=True)
  if build.returncode != 0 and "ubsan" in build.stderr:
    pytest.skip("the C++ compiler has no UBSan runtime")
  assert build.returncode == 0, build.stderr
  run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
  assert run.returncode == 0 and run.stdout.splitlines()[-1] == "errors: 0", run.stdout + run.stderr
  assert run.stdout.count(": ok") == 5, run.stdout
