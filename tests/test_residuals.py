"""Keep or recompute: `fused_moe(..., residuals="hidden")` against the recomputing backward.

Keeping each computed row's h = x @ w_in must change nothing but the work: the forward and all
four gradients are compared bitwise with `residuals="inputs"`, on one device, emulated devices,
a real 8-device `shard_map` (with routing skewed past the kept rows, and with a reassignment
plan), for gated and plain activations in float32 and bfloat16. Other tests check that the
backward does read the kept rows, that nothing of real size is kept otherwise, and where
`residuals="auto"` draws the line.

The tests run on JAX's default backend: on a GPU machine `JAX_PLATFORMS=cuda pytest
tests/test_residuals.py` checks the CUDA path the same way (the 8-device tests need 8 GPUs).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_ccfuser as ccf
from jax_ccfuser import _fused
from jax_ccfuser.experimental import fused_moe_emulated
from hardening_cases import make_forward_and_grads
from moe_cases import Case, assert_close, make_inputs, shard_ep, sharded


def _forward_and_grads(path: str, case: Case, residuals: str, with_plan: bool = False):
  """`(args, dy) -> (y, (dx, d expert_weights, dw_in, dw_out))` through `fused_moe` one way:
  on one device, on `case.devices` emulated ones, or under `shard_map` over as many."""
  if path == "emulated":
    def moe(*args, axis_name, plan, **kwargs):  # the whole stacked problem on one device
      return fused_moe_emulated(*args, num_devices=case.devices, residuals=residuals, **kwargs)
  else:
    moe = functools.partial(ccf.fused_moe, residuals=residuals)
  return make_forward_and_grads(moe, _devices(path, case), case.activation, with_plan)


def _devices(path: str, case: Case) -> int:
  """The devices a path runs on: emulated devices share one."""
  return case.devices if path == "shard_map" else 1


_needs_8_devices = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices")


def _assert_bitwise_alike(case: Case, path: str, with_plan: bool = False):
  """"hidden" gives what "inputs" gives, bitwise, and what `reference_moe` gives."""
  args = make_inputs(case)
  dy = jnp.asarray(np.random.default_rng(case.seed + 1).standard_normal(args[0].shape),
                   case.dtype)
  recomputed, kept = (
      jax.tree.leaves(_forward_and_grads(path, case, residuals, with_plan)(*args, dy))
      for residuals in ("inputs", "hidden"))
  for name, a, b in zip(("y", "dx", "d_weights", "dw_in", "dw_out"), kept, recomputed):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
  x, ids, weights, w_in, w_out = args
  with jax.default_matmul_precision("highest"):  # XLA:GPU would round float32 to TF32
    reference = sharded(ccf.reference_moe, _devices(path, case), activation=case.activation)(
        x.astype(jnp.float32), ids, weights, w_in.astype(jnp.float32), w_out.astype(jnp.float32))
  assert_close(kept[0], reference, case.dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("path,devices", [("one_device", 1), ("emulated", 4),
                                          pytest.param("shard_map", 8, marks=_needs_8_devices)])
def test_hidden_is_bitwise_recompute(path, devices, activation, dtype):
  # Several 128-row tiles per device on one device; a tile and a bit elsewhere.
  tokens = 150 if devices == 1 else 40
  _assert_bitwise_alike(Case(devices=devices, tokens=tokens, activation=activation, dtype=dtype,
                             seed=devices), path)


@_needs_8_devices
def test_busy_device_keeps_the_mean_and_recomputes_the_rest():
  """Device 0 computes several times T*K rows: it keeps the 128-row tiles within its first T*K
  and recomputes the others, the tile that straddles T*K included."""
  case = Case(devices=8, tokens=70, skew=1.0, seed=3)
  expert0_rows = int(np.sum(np.asarray(make_inputs(case)[1]) == 0))
  assert expert0_rows > 3 * 128 and 128 < case.tokens * case.k < 256
  _assert_bitwise_alike(case, "shard_map")


@_needs_8_devices
def test_with_a_reassignment_plan():
  case = Case(devices=8, tokens=40, skew=0.8, seed=21)
  # The plan make_forward_and_grads makes (tile 4): helpers compute (and keep) hot experts' rows.
  loads = sharded(lambda ids, axis_name: jnp.stack(ccf.plan_loads(ccf.reassign(
      ids, case.num_experts, axis_name=axis_name, tile=4)))[None], 8)(make_inputs(case)[1])
  before, after = np.asarray(loads)[0]  # every device's copy of the plan is the same
  assert after.max() < before.max()
  _assert_bitwise_alike(case, "shard_map", with_plan=True)


def _one_device_call(case: Case, residuals: str):
  """The custom calls of a one-device call: `(fwd, bwd, operands)`, fwd keeping h."""
  x, ids, weights, w_in, w_out = make_inputs(case)
  workers, bounds = _fused._plan_operands(None, case.num_experts, 1)
  static = _fused._Static(
      site=next(_fused._sites), num_devices=1, emulated=False, activation=case.activation,
      timeout_ms=10_000, num_experts=case.num_experts,
      kept_rows=_fused._kept_rows(residuals, case.tokens, case.k, w_in.shape[2],
                                  platform="cpu", plan_slots=1))
  operands = (x, ids, weights, w_in, w_out, workers, bounds, jnp.int32(0), jnp.int32(0))
  return (jax.jit(functools.partial(_fused._forward_call, static, True)),
          jax.jit(functools.partial(_fused._backward_call, static, True)), operands)


def test_backward_reads_the_kept_rows():
  """The kept h rows are the forward's x @ w_in, and the backward takes h from them: scaled
  rows change dw_out (through act(h)), the rows themselves give jax.grad's gradients."""
  case = Case(devices=1, tokens=150, seed=5)
  fwd, bwd, operands = _one_device_call(case, "hidden")
  y, hidden = fwd(*operands)
  x, ids, w_in = operands[0], operands[1], operands[3]
  assert hidden.shape == (case.tokens * case.k, 2 * case.ffn) and hidden.dtype == jnp.float32
  # The first tile (128 rows, expert 0's first) is the h of those rows.
  rows0 = np.flatnonzero(np.asarray(ids).ravel() == 0)
  assert len(rows0) >= 10
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(hidden[:10], x[rows0[:10] // case.k] @ w_in[0], rtol=1e-5,
                               atol=1e-5)
  dy = jnp.ones_like(y)
  grads = bwd(*operands, hidden, dy)
  expected = jax.grad(lambda *a: jnp.sum(ccf.fused_moe(*a, residuals="hidden")), (0, 2, 3, 4))(
      *operands[:5])
  for a, b in zip(grads, expected):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  tampered = bwd(*operands, hidden.at[:128].multiply(2.0), dy)
  assert not np.array_equal(np.asarray(tampered[3]), np.asarray(grads[3]))


def _fwd_results(lowered_text: str) -> list:
  """The result types of the forward custom calls in a lowered module's text."""
  return re.findall(r'stablehlo.custom_call @ccf_moe_fwd\(.*?\) -> \((.*?)\)', lowered_text)


def test_recompute_keeps_nothing_of_real_size():
  case = Case(devices=1, seed=6)
  args = make_inputs(case)
  dy = args[0]
  kept_shape = f"tensor<{case.tokens * case.k}x{2 * case.ffn}xf32>"
  none_kept = f"tensor<1x{2 * case.ffn}xf32>"  # one row holding nothing
  for residuals, want in (("inputs", none_kept), ("hidden", kept_shape)):
    text = _forward_and_grads("one_device", case, residuals).lower(*args, dy).as_text()
    (results,) = _fwd_results(text)
    assert results.endswith(want), (residuals, results)
  # A forward that is not differentiated keeps nothing either way.
  (results,) = _fwd_results(jax.jit(functools.partial(ccf.fused_moe, residuals="hidden")).lower(
      *args).as_text())
  assert results.endswith(none_kept)


def _boundary_shapes(jaxpr) -> list:
  """The shapes of every shard_map's results and every custom call's operands in a jaxpr, nested
  ones included."""
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "shard_map":
      shapes += [v.aval.shape for v in eqn.outvars]
    if eqn.primitive.name == "ffi_call":
      shapes += [v.aval.shape for v in eqn.invars]
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
          shapes += _boundary_shapes(getattr(sub, "jaxpr", sub))
  return shapes


def test_nothing_kept_passes_nothing_zero_sized():
  """Under shard_map, reverse mode splits the op into a forward and a backward manual computation,
  the forward's kept rows passing from one to the other into the backward custom call. With
  nothing kept they are one unused row, never zero-sized: XLA (jax 0.11) crashes (SIGSEGV)
  compiling a zero-sized shard_map residual, or a zero-sized custom-call operand under an eager
  shard_map."""
  case = Case(devices=2, seed=9)
  args = make_inputs(case)
  for residuals, kept in (("inputs", 1), ("hidden", case.devices * case.tokens * case.k)):
    shapes = _boundary_shapes(jax.make_jaxpr(_forward_and_grads("shard_map", case, residuals))(
        *args, args[0]).jaxpr)
    assert len(shapes) > 20, shapes  # the residuals and both calls' operands
    assert all(0 not in shape for shape in shapes), (residuals, shapes)
    assert (kept, 2 * case.ffn) in shapes, (residuals, shapes)


@pytest.mark.parametrize("residuals,saved,forward_calls", [
    ("inputs", None, 1), ("hidden", None, 2), ("hidden", "fused_moe_kept_rows", 1)])
def test_rematerialised_layers_run_the_forward_call_as_needed(residuals, saved, forward_calls):
  """Layers under `jax.checkpoint` (in a scan over layers, as `nnx.remat` and `nn.remat` make
  them): the backward rematerialises only what it reads. Keeping nothing, that is no forward
  call, which would otherwise run (with its exchange with the peers) twice a step; kept rows
  are read, so the call runs again unless a policy saves them by their name."""
  case = Case(devices=4, seed=11)
  x, ids, weights, w_in, w_out = make_inputs(case)
  w_ins, w_outs = jnp.stack([w_in, -0.5 * w_in]), jnp.stack([w_out, 0.7 * w_out])  # 2 layers
  policy = saved and jax.checkpoint_policies.save_only_these_names(saved)

  def grads(moe, remat: bool):
    def layers(x, ids, weights, w_ins, w_outs, *, axis_name):
      def layer(x, w):
        return moe(x, ids, weights, *w, axis_name=axis_name), None
      return jax.lax.scan(jax.checkpoint(layer, policy=policy) if remat else layer, x,
                          (w_ins, w_outs))[0]
    body = shard_ep(layers, case.devices, in_specs=(P("ep"),) * 3 + (P(None, "ep"),) * 2)
    loss = lambda x, weights, w_ins, w_outs: jnp.sum(jnp.sin(body(x, ids, weights, w_ins,
                                                                  w_outs)))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))

  fused = functools.partial(ccf.fused_moe, residuals=residuals)
  step = grads(fused, remat=True)
  hlo = step.lower(x, weights, w_ins, w_outs).compile().as_text()
  assert hlo.count('custom_call_target="ccf_moe_fwd"') == forward_calls
  assert hlo.count('custom_call_target="ccf_moe_bwd"') == 1
  got = step(x, weights, w_ins, w_outs)
  for a, b in zip(got, grads(fused, remat=False)(x, weights, w_ins, w_outs)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with jax.default_matmul_precision("highest"):
    want = grads(ccf.reference_moe, remat=True)(x, weights, w_ins, w_outs)
  for a, b in zip(got, want):
    assert float(jnp.abs(a).max()) > 0
    assert_close(a, b, case.dtype)


def test_auto_keeps_what_fits_the_budget():
  case = Case(devices=1, tokens=13, k=2, ffn=24, seed=7)
  args = make_inputs(case)
  kept_bytes = case.tokens * case.k * 2 * case.ffn * 4
  lower = lambda: _forward_and_grads("one_device", case, "auto").lower(*args, args[0]).as_text()
  with ccf.residual_budget(kept_bytes):
    (kept,) = _fwd_results(lower())
  with ccf.residual_budget(kept_bytes - 1):
    (recomputed,) = _fwd_results(lower())
  assert kept.endswith(f"tensor<{case.tokens * case.k}x{2 * case.ffn}xf32>")
  assert recomputed.endswith(f"tensor<1x{2 * case.ffn}xf32>")
  # The budget counts h's width: non-gated rows take half the bytes.
  kept = functools.partial(_fused._kept_rows, tokens=case.tokens, k=case.k, platform="cpu",
                           plan_slots=1)
  with ccf.residual_budget(kept_bytes // 2):
    assert kept("auto", gate_ffn=case.ffn) == case.tokens * case.k
    assert kept("auto", gate_ffn=2 * case.ffn) == 0
  # The CUDA handler keeps nothing under a plan with helper slots (its pairs are no longer one
  # slice of a device's work list): no buffer for it either. The CPU one keeps them.
  for residuals in ("hidden", "auto"):
    assert kept(residuals, gate_ffn=case.ffn, platform="gpu", plan_slots=4) == 0
    assert kept(residuals, gate_ffn=case.ffn, platform="gpu") == case.tokens * case.k
    assert kept(residuals, gate_ffn=case.ffn, plan_slots=4) == case.tokens * case.k
  with pytest.raises(ValueError, match="residuals must be one of"):
    kept("all", gate_ffn=case.ffn, platform="gpu", plan_slots=4)


def test_bad_options():
  args = make_inputs(Case(devices=1, seed=8))
  with pytest.raises(ValueError, match=r"residuals must be one of \('inputs', 'hidden', "
                                       r"'auto'\), got 'all'"):
    ccf.fused_moe(*args, residuals="all")
  for bad in (-1, 0.5, float("nan")):
    with pytest.raises(ValueError, match="residual_budget must be a whole number of bytes"):
      ccf.residual_budget(bad)
