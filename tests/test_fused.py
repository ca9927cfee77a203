"""fused_moe on CPU against reference_moe: forward, gradients, protocol, composition."""

import functools
import re

import jax
import jax.test_util
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_ccfuser as ccf
from jax_ccfuser import _extension
from jax_ccfuser.experimental import fused_moe_emulated
from moe_cases import (Case, assert_close, backward_weight_grads, ep_mesh, make_inputs,
                        sharded)


def _loss(moe_fn, devices, **kwargs):
  """A scalar loss with a random-projection cotangent, differentiable in x, weights, w_in, w_out."""
  f = sharded(moe_fn, devices, **kwargs) if devices else jax.jit(functools.partial(moe_fn, **kwargs))

  def loss(x, ids, weights, w_in, w_out, proj):
    return jnp.sum(f(x, ids, weights, w_in, w_out).astype(jnp.float32) * proj)

  return loss


def _check_against_reference(case: Case, *, grads=True, scale=1.0):
  x, ids, weights, w_in, w_out = make_inputs(case)
  proj = jnp.asarray(np.random.default_rng(case.seed + 1).standard_normal(x.shape), jnp.float32)
  kwargs = dict(activation=case.activation)
  ref_args = [a.astype(jnp.float32) for a in (x, ids, weights, w_in, w_out)]
  ref_args[1] = ids
  y = sharded(ccf.fused_moe, case.devices, **kwargs)(x, ids, weights, w_in, w_out)
  y_ref = sharded(ccf.reference_moe, case.devices, **kwargs)(*ref_args)
  assert y.dtype == x.dtype and y.shape == x.shape
  assert_close(y, y_ref, case.dtype, scale)
  if not grads:
    return
  argnums = (0, 2, 3, 4)
  g = jax.grad(_loss(ccf.fused_moe, case.devices, **kwargs), argnums)(x, ids, weights, w_in,
                                                                     w_out, proj)
  g_ref = jax.grad(_loss(ccf.reference_moe, case.devices, **kwargs), argnums)(*ref_args, proj)
  for name, a, b in zip(("dx", "d_weights", "dw_in", "dw_out"), g, g_ref):
    assert a.dtype == {"d_weights": weights.dtype}.get(name, x.dtype), name
    # Gradients sum over many rows; scale the tolerance with the reference's magnitude.
    assert_close(a, b, case.dtype, scale * max(1.0, float(jnp.max(jnp.abs(b))) / 4))


@pytest.mark.parametrize("devices", [1, 2, 4, 8])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_matches_reference(devices, activation):
  _check_against_reference(Case(devices=devices, activation=activation, seed=devices))


@pytest.mark.parametrize("activation", ["geglu", "relu", "silu"])
def test_other_activations(activation):
  _check_against_reference(Case(devices=4, activation=activation, seed=7))


@pytest.mark.parametrize("activation", ["gelu", "geglu"])
@pytest.mark.parametrize("gate", [-5.0, -7.0])
def test_gelu_keeps_its_relative_accuracy_in_the_negative_tail(activation, gate):
  """gelu(h) at h = -5 and -7 is -1.4e-6 and -9e-12: computed as 0.5 h (1 + erf(h / sqrt 2)) it
  cancelled (4% off at -5, exactly 0 at -7), where jax.nn.gelu and the reference use erfc.
  Every gate here is near `gate`, so outputs and gradients are that small and compared relative
  to their own size."""
  case = Case(devices=1, tokens=16, activation=activation, seed=41)
  _, ids, weights, w_in, w_out = make_inputs(case)
  rng = np.random.default_rng(case.seed)
  x = jnp.asarray(1 + 0.05 * rng.standard_normal((case.tokens, case.hidden)), jnp.float32)
  w_in = w_in * 0.02 + jnp.where(jnp.arange(w_in.shape[-1]) < case.ffn, gate / case.hidden, 0.0)
  gates = jnp.einsum("th,ehf->tef", x, w_in[..., :case.ffn])
  assert float(jnp.max(jnp.abs(gates - gate))) < 0.5
  proj = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

  def run(moe_fn):  # y and the gradients of a random projection of it
    layer = functools.partial(moe_fn, activation=activation)
    y, vjp = jax.vjp(lambda x, weights, w_in, w_out: layer(x, ids, weights, w_in, w_out), x,
                     weights, w_in, w_out)
    return y, *vjp(proj)

  for name, got, want in zip(("y", "dx", "d_weights", "dw_in", "dw_out"),
                             jax.jit(lambda: run(ccf.fused_moe))(),
                             jax.jit(lambda: run(ccf.reference_moe))()):
    want = np.asarray(want)
    assert np.max(np.abs(want)) > 0, name
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4,
                               atol=1e-4 * np.max(np.abs(want)), err_msg=name)


@pytest.mark.parametrize("k,experts_local", [(1, 1), (3, 2), (8, 4), (8, 1)])
def test_k_and_experts(k, experts_local):
  _check_against_reference(Case(devices=4, k=k, experts_local=experts_local, tokens=29,
                                seed=k * 10 + experts_local))


def test_skewed_routing_crosses_tiles():
  # Most of 8 * 70 * 2 rows go to expert 0: one device computes several 128-row panels.
  _check_against_reference(Case(devices=8, tokens=70, skew=1.0, seed=3))


def test_empty_experts_and_one_destination():
  """Every row goes to device 2's experts; all other experts (and devices) get no rows."""
  case = Case(devices=4, tokens=21, k=3, experts_local=2, seed=5)
  x, ids, weights, w_in, w_out = make_inputs(case)
  ids = jnp.asarray(np.random.default_rng(0).integers(4, 6, size=ids.shape), jnp.int32)
  y = sharded(ccf.fused_moe, 4)(x, ids, weights, w_in, w_out)
  assert_close(y, sharded(ccf.reference_moe, 4)(x, ids, weights, w_in, w_out), jnp.float32)
  proj = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape), jnp.float32)
  g = jax.grad(_loss(ccf.fused_moe, 4), (0, 2, 3, 4))(x, ids, weights, w_in, w_out, proj)
  g_ref = jax.grad(_loss(ccf.reference_moe, 4), (0, 2, 3, 4))(x, ids, weights, w_in, w_out, proj)
  for a, b in zip(g, g_ref):
    assert_close(a, b, jnp.float32, max(1.0, float(jnp.max(jnp.abs(b))) / 4))
  for a in g[2:]:  # experts that received no rows get exactly zero weight gradient
    assert not np.any(np.asarray(a)[[0, 1, 2, 3, 6, 7]])


def test_repeated_id_counts_twice():
  case = Case(devices=2, k=2, seed=11)
  x, ids, weights, w_in, w_out = make_inputs(case)
  ids = jnp.stack([ids[:, 0], ids[:, 0]], axis=1)
  y = sharded(ccf.fused_moe, 2)(x, ids, weights, w_in, w_out)
  merged = jnp.stack([weights.sum(1), jnp.zeros_like(weights[:, 0])], axis=1)
  y_merged = sharded(ccf.reference_moe, 2)(x, ids, merged, w_in, w_out)
  assert_close(y, y_merged, jnp.float32)
  # And the backward: each repeat adds its own gradient (weights' two columns alike).
  proj = jnp.asarray(np.random.default_rng(3).standard_normal(x.shape), jnp.float32)
  g = jax.grad(_loss(ccf.fused_moe, 2), (0, 2, 3, 4))(x, ids, weights, w_in, w_out, proj)
  g_ref = jax.grad(_loss(ccf.reference_moe, 2), (0, 2, 3, 4))(x, ids, weights, w_in, w_out, proj)
  for a, b in zip(g, g_ref):
    assert_close(a, b, jnp.float32, max(1.0, float(jnp.max(jnp.abs(b))) / 4))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision(dtype):
  _check_against_reference(Case(devices=4, dtype=dtype, seed=2))


def test_bf16_with_float32_weights_and_bf16_combine_weights():
  case = Case(devices=2, dtype=jnp.bfloat16, seed=9)
  x, ids, weights, w_in, w_out = make_inputs(case)
  for wts in (weights, weights.astype(jnp.bfloat16)):
    y = sharded(ccf.fused_moe, 2)(x, ids, wts, w_in, w_out)
    y_ref = sharded(ccf.reference_moe, 2)(*(a.astype(jnp.float32) for a in (x,)), ids,
                                          wts.astype(jnp.float32), w_in.astype(jnp.float32),
                                          w_out.astype(jnp.float32))
    assert y.dtype == jnp.bfloat16
    assert_close(y, y_ref, jnp.bfloat16)
    proj = jnp.asarray(np.random.default_rng(2).standard_normal(x.shape), jnp.float32)
    dw = jax.grad(_loss(ccf.fused_moe, 2), 2)(x, ids, wts, w_in, w_out, proj)
    dw_ref = jax.grad(_loss(ccf.reference_moe, 2), 2)(
        x.astype(jnp.float32), ids, wts.astype(jnp.float32), w_in.astype(jnp.float32),
        w_out.astype(jnp.float32), proj)
    assert dw.dtype == wts.dtype
    assert_close(dw, dw_ref, jnp.bfloat16, max(1.0, float(jnp.max(jnp.abs(dw_ref))) / 4))


def test_weak_typed_x_gives_strong_results_as_the_reference_does():
  """A weak x (a Python scalar broadcast) makes neither y nor any gradient weak: else y + a
  bfloat16 array turns bfloat16, where reference_moe's y keeps float32."""
  x, ids, weights, w_in, w_out = make_inputs(Case(devices=1, tokens=6, seed=90))
  weak_x = jnp.broadcast_to(0.5, x.shape)
  assert jax.typeof(weak_x).weak_type
  for moe_fn in (ccf.fused_moe, ccf.reference_moe):
    loss = lambda *a: jnp.sum(moe_fn(*a))
    y = jax.jit(moe_fn)(weak_x, ids, weights, w_in, w_out)
    grads = jax.jit(jax.grad(loss, argnums=(0, 2, 3, 4)))(weak_x, ids, weights, w_in, w_out)
    assert not any(jax.typeof(a).weak_type for a in (y, *grads)), moe_fn.__name__
    assert (y + jnp.ones(x.shape, jnp.bfloat16)).dtype == jnp.float32


def test_no_axis_name():
  case = Case(devices=1, experts_local=5, tokens=31, k=3, seed=4)
  x, ids, weights, w_in, w_out = make_inputs(case)
  y = jax.jit(ccf.fused_moe)(x, ids, weights, w_in, w_out)
  assert_close(y, ccf.reference_moe(x, ids, weights, w_in, w_out), jnp.float32)
  g = jax.grad(_loss(ccf.fused_moe, 0), (0, 2, 3, 4))(x, ids, weights, w_in, w_out, x)
  g_ref = jax.grad(_loss(ccf.reference_moe, 0), (0, 2, 3, 4))(x, ids, weights, w_in, w_out, x)
  for a, b in zip(g, g_ref):
    assert_close(a, b, jnp.float32, 4.0)


def test_check_grads_numerically():
  """Reverse-mode gradients against finite differences (float32, tiny problem)."""
  case = Case(devices=1, tokens=4, hidden=4, ffn=3, experts_local=3, activation="gelu", seed=8)
  x, ids, weights, w_in, w_out = make_inputs(case)
  jax.test_util.check_grads(lambda x, w, a, b: ccf.fused_moe(x, ids, w, a, b, activation="gelu"),
                            (x, weights, w_in, w_out), order=1, modes=["rev"], atol=5e-2,
                            rtol=5e-2, eps=1e-2)


def test_emulated_peers_match_real_devices():
  """Bitwise, gradients too. On CPU the GEMMs' column blocks follow the cores a device's call
  gets (OpenBLAS's bits depend on a block's width): the emulated call gets the share each of D
  real devices gets (it took them all: 2 cores here against 1 each, and dx, d_weights and
  dw_in differed). H and G*F of 128 and 256 split into blocks."""
  case = Case(devices=4, tokens=19, hidden=128, ffn=128, k=3, skew=0.5, seed=12)
  args = make_inputs(case)
  y_real = sharded(ccf.fused_moe, 4)(*args)
  emulated = jax.jit(functools.partial(fused_moe_emulated, num_devices=4))
  np.testing.assert_array_equal(np.asarray(emulated(*args)), np.asarray(y_real))
  g_real = jax.grad(_loss(ccf.fused_moe, 4), (0, 2, 3, 4))(*args, args[0])
  g_emul = jax.grad(lambda *a: jnp.sum(emulated(*a[:5]) * a[5]), (0, 2, 3, 4))(*args, args[0])
  for a, b in zip(g_emul, g_real):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tf32_opt_in_leaves_cpu_calls_exact():
  """CPU calls have no TF32: under JAX's TF32 precision they compute as before, bitwise."""
  case = Case(devices=2, tokens=11, k=2, seed=21)
  args = make_inputs(case)
  run = lambda: jax.jit(jax.value_and_grad(_loss(ccf.fused_moe, 2), (0, 2, 3, 4)))(*args,
                                                                                   args[0])
  exact = jax.tree.map(np.asarray, run())
  with jax.default_matmul_precision("tensorfloat32"):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, run()), exact)


def test_deterministic_bitwise():
  case = Case(devices=8, tokens=40, k=4, skew=0.7, seed=6)
  args = make_inputs(case)
  loss = _loss(ccf.fused_moe, 8)
  grad = jax.jit(jax.value_and_grad(loss, (0, 2, 3, 4)))
  first = jax.tree.map(np.asarray, grad(*args, args[0]))
  for _ in range(3):
    again = jax.tree.map(np.asarray, grad(*args, args[0]))
    jax.tree.map(np.testing.assert_array_equal, again, first)


@pytest.mark.parametrize("with_plan", [False, True])
def test_frozen_experts_skip_their_weight_gradients(with_plan):
  """Differentiating x and the combine weights alone (frozen experts: fine-tuning the router or
  what lies around the layer) tells the backward call that dw_in and dw_out are not wanted; dx
  and d expert_weights are bitwise those of the full backward."""
  case = Case(devices=8, tokens=40, k=4, skew=0.7, seed=12)
  x, ids, weights, w_in, w_out = make_inputs(case)
  proj = jnp.asarray(np.random.default_rng(13).standard_normal(x.shape), jnp.float32)

  def planned(moe):
    def layer(x, ids, weights, w_in, w_out, *, axis_name):
      plan = (ccf.reassign(ids, case.num_experts, axis_name=axis_name, tile=4) if with_plan
              else None)
      return moe(x, ids, weights, w_in, w_out, axis_name=axis_name, plan=plan)
    return _loss(layer, case.devices)

  args = (x, ids, weights, w_in, w_out, proj)
  full, frozen = (jax.jit(jax.grad(planned(ccf.fused_moe), argnums))
                  for argnums in ((0, 2, 3, 4), (0, 2)))
  assert backward_weight_grads(full.lower(*args).as_text()) == [1]
  assert backward_weight_grads(frozen.lower(*args).as_text()) == [0]
  got, want = frozen(*args), full(*args)
  for name, a, b in zip(("dx", "d_weights"), got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
  reference = jax.grad(planned(ccf.reference_moe), (0, 2))(*args)
  for a, b in zip(got, reference):
    assert_close(a, b, case.dtype, max(1.0, float(jnp.max(jnp.abs(b))) / 4))


def test_hlo_has_no_all_to_all_or_all_gather():
  args = make_inputs(Case(devices=4))

  def forward_and_backward(x, ids, weights, w_in, w_out, dy, axis_name):
    y, vjp = jax.vjp(lambda *a: ccf.fused_moe(a[0], ids, *a[1:], axis_name=axis_name),
                     x, weights, w_in, w_out)
    return (y, *vjp(dy))

  hlo = sharded(forward_and_backward, 4).lower(*args, args[0]).compile().as_text()
  assert "ccf_moe_fwd" in hlo and "ccf_moe_bwd" in hlo
  for op in ("all-to-all", "all-gather", "all-reduce", "collective-permute"):
    assert op not in hlo, op
  # The baseline does use all-to-all: the check above can fail.
  baseline = sharded(ccf.all_to_all_moe, 4).lower(*args).compile().as_text()
  assert "all-to-all" in baseline


def test_out_of_range_id_raises_and_next_call_works():
  case = Case(devices=4, seed=13)
  x, ids, weights, w_in, w_out = make_inputs(case)
  f = sharded(ccf.fused_moe, 4)
  for bad in (case.num_experts, -1):
    bad_ids = ids.at[2 * case.tokens + 5, 1].set(bad)  # device 2, token 5, k 1
    with pytest.raises(jax.errors.JaxRuntimeError, match=re.escape(
        f"expert_ids[5, 1] = {bad} on device 2 is outside [0, {case.num_experts})")):
      jax.block_until_ready(f(x, bad_ids, weights, w_in, w_out))
  assert_close(f(x, ids, weights, w_in, w_out),
               sharded(ccf.reference_moe, 4)(x, ids, weights, w_in, w_out), jnp.float32)


def test_bad_id_in_backward_raises():
  case = Case(devices=2, seed=14)
  x, ids, weights, w_in, w_out = make_inputs(case)
  bad_ids = ids.at[3, 0].set(1000)
  with pytest.raises(jax.errors.JaxRuntimeError, 
                     match=re.escape("expert_ids[3, 0] = 1000 on device 0 is outside [0, 4)")):
    jax.block_until_ready(jax.grad(_loss(ccf.fused_moe, 2), 0)(x, bad_ids, weights, w_in,
                                                               w_out, x))


def test_missing_peer_times_out_and_next_call_works():
  """Device 0 takes another branch and never calls: the others raise after the timeout."""
  case = Case(devices=4, seed=15)
  args = make_inputs(case)

  def body(x, ids, weights, w_in, w_out, axis_name):
    skip = jax.lax.axis_index(axis_name) == 0
    return jax.lax.cond(skip, lambda: x,
                        lambda: ccf.fused_moe(x, ids, weights, w_in, w_out, axis_name=axis_name))

  with ccf.peer_timeout(1.0):
    f = sharded(body, 4)
    with pytest.raises(jax.errors.JaxRuntimeError,
                       match=r"DEADLINE_EXCEEDED: .*waited 1000 ms at the publish barrier.*never arrived: 0"):
      jax.block_until_ready(f(*args))
    g = sharded(ccf.fused_moe, 4)
    assert_close(g(*args), sharded(ccf.reference_moe, 4)(*args), jnp.float32)


def test_composes_with_checkpoint_scan_and_two_sites():
  """Two layers scanned, each rematerialised, plus a second call site, over several steps."""
  case = Case(devices=4, tokens=16, hidden=16, ffn=8, experts_local=2, seed=16)
  x, ids, weights, w_in, w_out = make_inputs(case)
  w_in2, w_out2 = jnp.stack([w_in, 0.5 * w_in]), jnp.stack([w_out, -w_out])

  def model(moe_fn):
    def body(x, ids, weights, w_in2, w_out2, axis_name):
      def layer(h, w):
        y = jax.checkpoint(lambda h: moe_fn(h, ids, weights, w[0], w[1], axis_name=axis_name))(h)
        return h + y, None
      h, _ = jax.lax.scan(layer, x, (w_in2, w_out2))
      side = moe_fn(x, ids, weights, w_in2[1], w_out2[0], axis_name=axis_name)
      return h + side
    mesh = ep_mesh(4)
    spec = (P("ep"), P("ep"), P("ep"), P(None, "ep"), P(None, "ep"))
    f = jax.shard_map(functools.partial(body, axis_name="ep"), mesh=mesh, in_specs=spec,
                      out_specs=P("ep"))
    return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(jnp.tanh(f(*a))), argnums=(0, 3, 4)))

  fused, ref = model(ccf.fused_moe), model(ccf.reference_moe)
  for step in range(3):
    scale = 1.0 + 0.1 * step
    (l, g), (l_ref, g_ref) = (m(x * scale, ids, weights, w_in2, w_out2) for m in (fused, ref))
    assert_close(l, l_ref, jnp.float32, 10.0)
    for a, b in zip(g, g_ref):
      assert_close(a, b, jnp.float32, 10.0)


def test_vmap_runs_each_batch_element():
  case = Case(devices=1, tokens=7, experts_local=3, seed=17)
  x, ids, weights, w_in, w_out = make_inputs(case)
  xs = jnp.stack([x, 2 * x])
  y = jax.vmap(lambda x: ccf.fused_moe(x, ids, weights, w_in, w_out))(xs)
  for i in range(2):
    assert_close(y[i], ccf.reference_moe(xs[i], ids, weights, w_in, w_out), jnp.float32)


@pytest.mark.parametrize("order", ["grad_of_vmap", "vmap_of_grad"])
def test_gradients_of_a_vmapped_layer(order):
  """Batched gradients, whichever transformation comes first, against reference_moe's."""
  case = Case(devices=1, tokens=7, experts_local=3, seed=19)
  x, ids, weights, w_in, w_out = make_inputs(case)
  xs = jnp.stack([x, -0.5 * x])

  def grads(op):
    one = lambda x, w_in, w_out: jnp.sum(op(x, ids, weights, w_in, w_out) ** 2)
    if order == "grad_of_vmap":
      batched = lambda xs, w_in, w_out: jax.vmap(one, (0, None, None))(xs, w_in, w_out).sum()
      return jax.jit(jax.grad(batched, (0, 1, 2)))(xs, w_in, w_out)
    return jax.jit(jax.vmap(jax.grad(one, (0, 1, 2)), (0, None, None)))(xs, w_in, w_out)

  for a, b in zip(grads(ccf.fused_moe), grads(ccf.reference_moe)):
    assert a.shape == b.shape
    assert_close(a, b, jnp.float32, 10.0)


def test_registry_does_not_grow_with_steps():
  args = make_inputs(Case(devices=4, seed=18))
  f = sharded(ccf.fused_moe, 4)
  jax.block_until_ready(f(*args))
  count = _extension.cpu.peer_group_count()
  for _ in range(5):
    jax.block_until_ready(f(*args))
  assert _extension.cpu.peer_group_count() == count


def test_mesh_with_data_axis_forms_independent_groups():
  """A 2 x 4 (data, expert) mesh: two expert-parallel groups run the same site at once."""
  case = Case(devices=8, tokens=11, seed=19)
  x, ids, weights, w_in, w_out = make_inputs(case)
  e = case.num_experts // 2  # experts of one group of 4 devices
  ids = ids % e
  w_in, w_out = w_in[:e], w_out[:e]
  mesh = jax.make_mesh((2, 4), ("data", "ep"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  spec_tok, spec_w = P(("data", "ep")), P("ep")

  def run(moe_fn):
    body = functools.partial(moe_fn, axis_name="ep")
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec_tok, spec_tok, spec_tok,
                                                            spec_w, spec_w),
                                 out_specs=spec_tok))(x, ids, weights, w_in, w_out)

  assert_close(run(ccf.fused_moe), run(ccf.reference_moe), jnp.float32)


def test_timeout_names_the_group_on_a_2d_mesh():
  """Each group of a 2 x 2 (data, ep) mesh numbers its devices 0 and 1: the error says which
  group's device 0 never came."""
  case = Case(devices=4, tokens=6, seed=20)
  x, ids, weights, w_in, w_out = make_inputs(case)
  e = case.num_experts // 2
  ids, w_in, w_out = ids % e, w_in[:e], w_out[:e]
  mesh = jax.make_mesh((2, 2), ("data", "ep"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  spec_tok, spec_w = P(("data", "ep")), P("ep")

  def body(x, ids, weights, w_in, w_out):
    skip = (jax.lax.axis_index("data") == 1) & (jax.lax.axis_index("ep") == 0)
    return jax.lax.cond(skip, lambda: x,
                        lambda: ccf.fused_moe(x, ids, weights, w_in, w_out, axis_name="ep"))

  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec_tok,) * 3 + (spec_w,) * 2,
                            out_specs=spec_tok))
  with ccf.peer_timeout(1.0), pytest.raises(
      jax.errors.JaxRuntimeError,
      match=r"device 1 of 2 in group 1 waited 1000 ms at the publish barrier; these peers "
            r"never arrived: 0\."):
    jax.block_until_ready(f(x, ids, weights, w_in, w_out))


def test_two_mesh_axes_as_one_expert_axis():
  """axis_name=("a", "b") over a 2 x 4 mesh: one group of 8 devices ranked a-major, as
  shard_map's P(("a", "b")) splits the tokens and experts; forward, gradients and a plan."""
  case = Case(devices=8, tokens=6, seed=21)
  args = make_inputs(case)
  mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  spec = P(("a", "b"))

  def layer(x, ids, weights, w_in, w_out, *, plan):
    axes = ("a", "b")
    return ccf.fused_moe(x, ids, weights, w_in, w_out, axis_name=axes,
                         plan=ccf.reassign(ids, case.num_experts, axis_name=axes) if plan else None)

  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
  want = jax.jit(jax.value_and_grad(loss(ccf.reference_moe), (0, 2, 3, 4)))(*args)
  for plan in (False, True):
    mapped = jax.shard_map(functools.partial(layer, plan=plan), mesh=mesh, in_specs=(spec,) * 5,
                           out_specs=spec)
    got = jax.jit(jax.value_and_grad(loss(mapped), (0, 2, 3, 4)))(*args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert_close(g, w, jnp.float32)


@pytest.mark.parametrize("data", [2, 1])
def test_shard_map_must_be_manual_over_every_axis_of_size_above_one(data):
  """Left to XLA, a data axis of size 2 would run each expert-parallel group once per data
  device, both copies meeting as one group (wrong sums, stalls or crashes, by run); one of size
  1 is harmless."""
  case = Case(devices=4, tokens=11, seed=20)
  x, ids, weights, w_in, w_out = make_inputs(case)
  mesh = jax.make_mesh((data, 4), ("data", "ep"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

  def run(moe_fn):
    body = functools.partial(moe_fn, axis_name="ep")
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 5, out_specs=P("ep"),
                                 axis_names={"ep"}))(x, ids, weights, w_in, w_out)

  if data > 1:
    with pytest.raises(ValueError, match=r"manual over every mesh axis of size > 1; \['data'\]"):
      run(ccf.fused_moe)
  else:
    assert_close(run(ccf.fused_moe), run(ccf.reference_moe), jnp.float32)


@pytest.mark.parametrize("map_fn", ["vmap", "pmap"])
def test_axis_name_of_a_vmap_is_refused_and_of_a_pmap_runs(map_fn):
  """The members of a vmap axis are one device's batch: each would wait a whole peer timeout for
  the others, so fused_moe refuses the axis while tracing. A pmap axis is a mesh axis."""
  case = Case(devices=4, tokens=9, seed=21)
  per_device = [a.reshape(4, a.shape[0] // 4, *a.shape[1:]) for a in make_inputs(case)]

  def run(moe_fn):
    body = functools.partial(moe_fn, axis_name="ep")
    return getattr(jax, map_fn)(body, axis_name="ep")(*per_device)

  if map_fn == "vmap":
    with pytest.raises(ValueError, match=r"axis_name \['ep'\] is not a mesh axis here \(bound "
                                         r"by jax.vmap\?\)"):
      run(ccf.fused_moe)
  else:
    expected = run(ccf.reference_moe)
    assert_close(run(ccf.fused_moe), expected, jnp.float32)
