"""The Flax MoE layers: NNX against the reference for each dispatch, gradients, Linen == NNX, Optax.

Each layer call is checked against `route` + `reference_moe` on the same weights, computed on one
device without any mesh.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import PartitionSpec as P

from jax_ccfuser import linen as ccf_linen
from jax_ccfuser import nnx as ccf_nnx
from jax_ccfuser import reference_moe, route
from models.moe_lm import LMConfig, MoeLM
from models.train import TrainConfig, batch_placer, make_optimizer, train
from moe_cases import assert_close, ep_mesh

DEVICES = 4
HIDDEN, FFN, EXPERTS, K = 16, 24, 8, 2


def _tokens(dtype=jnp.float32, *, shape=(4, 5, HIDDEN)):
  """`[4, 5, H]`: 20 tokens, 5 per device on the 4-device mesh."""
  return jax.random.normal(jax.random.key(7), shape, jnp.float32).astype(dtype)


def _layer(**options):
  """An NNX MoE layer with the test's sizes, built under whatever mesh is set."""
  return ccf_nnx.MoE(HIDDEN, FFN, EXPERTS, k=K, axis_name="ep", rngs=nnx.Rngs(0), **options)


def _expected(layer, x, activation="swiglu"):
  """The layer's function from its weights: route + reference_moe on one device, float32."""
  return _route_and_reference(x, layer.router.kernel[...], layer.w_in[...], layer.w_out[...],
                              activation=activation)


@functools.partial(jax.jit, static_argnames="activation")
def _route_and_reference(x, router_kernel, w_in, w_out, *, activation):
  x2d = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  ids, weights, aux = route(x2d @ router_kernel, K)
  y = reference_moe(x2d, ids, weights, w_in, w_out, activation=activation)
  return y.reshape(x.shape), aux


def _apply(layer, x):
  return nnx.jit(lambda layer, x: layer(x))(layer, x)


@pytest.mark.parametrize("dispatch", ["fused", "all_to_all", "reference"])
def test_matches_reference_on_a_mesh(dispatch):
  with jax.set_mesh(ep_mesh(DEVICES)):
    layer = _layer(dispatch=dispatch)
    # The expert weights are created split over the expert axis; the router is replicated.
    assert layer.w_in[...].sharding.spec == P("ep", None, None)
    assert layer.w_out[...].sharding.spec == P("ep", None, None)
    assert layer.router.kernel[...].sharding.spec == P()
    y, aux = _apply(layer, _tokens())
  want_y, want_aux = _expected(layer, _tokens())
  assert y.shape == (4, 5, HIDDEN) and y.dtype == jnp.float32
  assert_close(y, want_y, jnp.float32)
  np.testing.assert_array_equal(aux.counts, want_aux.counts)
  assert int(aux.counts.sum()) == 20 * K
  np.testing.assert_allclose(aux.load_balancing_loss, want_aux.load_balancing_loss, rtol=1e-5)
  np.testing.assert_allclose(aux.z_loss, want_aux.z_loss, rtol=1e-5)


def test_fused_equals_all_to_all():
  with jax.set_mesh(ep_mesh(DEVICES)):
    fused, _ = _apply(_layer(dispatch="fused"), _tokens())
    baseline, _ = _apply(_layer(dispatch="all_to_all"), _tokens())
  assert_close(fused, baseline, jnp.float32)


@pytest.mark.slow
def test_reassign_flag_balances_devices_and_keeps_the_function():
  # Tokens shifted off-centre so the router favours a few experts.
  x = _tokens(shape=(8, 16, HIDDEN)) + 2.0
  with jax.set_mesh(ep_mesh(DEVICES)):
    plain, plain_aux = _apply(_layer(), x)
    moved, aux = _apply(_layer(reassign=True), x)
    grads = [nnx.state(nnx.grad(_objective)(_layer(reassign=r), x), nnx.Param)
             for r in (False, True)]
  assert_close(moved, plain, jnp.float32)
  jax.tree.map(lambda a, b: assert_close(a, b, jnp.float32, 10.0), *grads)
  before, after = np.asarray(aux.device_loads)
  np.testing.assert_array_equal(before, np.asarray(plain_aux.device_loads)[1])
  assert before.sum() == after.sum() == 8 * 16 * K
  assert after.max() < before.max()
  with pytest.raises(ValueError, match="reassign=True needs dispatch='fused'"):
    _layer(reassign=True, dispatch="all_to_all")


def test_without_a_mesh():
  # With no mesh set the expert axis is only an annotation: one device runs every expert.
  layer = _layer()
  assert layer.w_in.get_metadata()["out_sharding"] == ("ep", None, None)
  y, aux = _apply(layer, _tokens())
  want_y, want_aux = _expected(layer, _tokens())
  assert_close(y, want_y, jnp.float32)
  np.testing.assert_array_equal(aux.counts, want_aux.counts)
  no_axis = ccf_nnx.MoE(HIDDEN, FFN, EXPERTS, k=K, axis_name=None, rngs=nnx.Rngs(0))
  assert "out_sharding" not in no_axis.w_in.get_metadata()
  assert_close(_apply(no_axis, _tokens())[0], want_y, jnp.float32)


def test_inside_a_users_shard_map():
  # Already inside shard_map over the expert axis, the layer takes its shards as they come.
  with jax.set_mesh(ep_mesh(DEVICES)):
    layer = _layer()
    graphdef, state = nnx.split(layer)
    body = lambda state, x: nnx.merge(graphdef, state)(x)
    mapped = jax.shard_map(body, in_specs=(nnx.get_partition_spec(state), P("ep")),
                           out_specs=(P("ep"), P()))
    y, aux = jax.jit(mapped)(state, _tokens())
  want_y, want_aux = _expected(layer, _tokens())
  assert_close(y, want_y, jnp.float32)
  np.testing.assert_array_equal(aux.counts, want_aux.counts)


def test_bfloat16_compute():
  with jax.set_mesh(ep_mesh(DEVICES)):
    layer = _layer(dtype=jnp.bfloat16, activation="gelu")
    assert layer.w_in[...].dtype == jnp.float32  # stored in param_dtype
    assert layer.w_in[...].shape == (EXPERTS, HIDDEN, FFN)  # not gated: [E, H, F]
    y, _ = _apply(layer, _tokens())
  assert y.dtype == jnp.bfloat16
  assert_close(y, _expected(layer, _tokens(), activation="gelu")[0], jnp.bfloat16)


def test_bad_options():
  with pytest.raises(ValueError, match="capacity_factor applies to dispatch='all_to_all'"):
    _layer(capacity_factor=1.25)
  with pytest.raises(ValueError, match="unknown dispatch"):
    _layer(dispatch="nccl")
  with pytest.raises(ValueError, match="not the expert axis 'expert'"):
    with jax.set_mesh(ep_mesh(DEVICES)):
      ccf_nnx.MoE(HIDDEN, FFN, EXPERTS, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="do not split evenly"):
    with jax.set_mesh(ep_mesh(DEVICES)):
      _layer()(_tokens(shape=(1, 3, HIDDEN)))


def _objective(layer, x):
  """A loss touching every output and both auxiliaries, so every parameter gets a gradient."""
  y, aux = layer(x)
  return jnp.sum(jnp.sin(y)) + aux.load_balancing_loss + 0.1 * aux.z_loss


@pytest.mark.parametrize("dispatch", ["fused", "all_to_all"])
def test_gradients_reach_router_and_experts(dispatch):
  with jax.set_mesh(ep_mesh(DEVICES)):
    layer = _layer(dispatch=dispatch)
    grads = nnx.jit(nnx.grad(_objective))(layer, _tokens())
  local = ccf_nnx.MoE(HIDDEN, FFN, EXPERTS, k=K, dispatch="reference", axis_name=None,
                      rngs=nnx.Rngs(0))
  want = nnx.jit(nnx.grad(_objective))(local, _tokens())
  got, want = nnx.to_pure_dict(grads), nnx.to_pure_dict(want)
  for path in (("router", "kernel"), ("w_in",), ("w_out",)):
    g, w = functools.reduce(dict.__getitem__, path, got), functools.reduce(dict.__getitem__,
                                                                          path, want)
    assert float(jnp.abs(g).max()) > 0, path
    assert_close(g, w, jnp.float32)


@pytest.mark.parametrize("on_mesh", [False, True])
def test_linen_equals_nnx(on_mesh):
  # Like Flax's TestLinenConsistency: the same weights in both layers give the same outputs.
  mesh = ep_mesh(DEVICES)
  with jax.set_mesh(mesh) if on_mesh else contextlib.nullcontext():
    layer = _layer(dispatch="fused")
    twin = ccf_linen.MoE(num_experts=EXPERTS, ffn=FFN, k=K, axis_name="ep", dispatch="fused")
    boxed = twin.init(jax.random.key(1), _tokens())
    # Same tree, shapes and partitioning as the NNX layer.
    nnx_params = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
    linen_params = nn.unbox(boxed)["params"]
    assert (jax.tree.map(jnp.shape, linen_params) == jax.tree.map(jnp.shape, nnx_params))
    assert nn.get_partition_spec(boxed)["params"]["w_in"] == P("ep", None, None)
    assert nn.get_partition_spec(boxed)["params"]["w_out"] == P("ep", None, None)
    y_nnx, aux_nnx = _apply(layer, _tokens())
    y_linen, aux_linen = jax.jit(twin.apply)({"params": nnx_params}, _tokens())
  np.testing.assert_array_equal(y_linen, y_nnx)
  jax.tree.map(np.testing.assert_array_equal, aux_linen, aux_nnx)


@pytest.mark.slow
def test_same_optax_loop_trains_dense_and_moe():
  # models.train.train knows nothing about experts: a dense and an MoE model go through it as is.
  mesh = ep_mesh(DEVICES)
  config = TrainConfig(batch=4, learning_rate=1e-2, warmup_steps=2, total_steps=12)
  # A short periodic text: learnable within a dozen steps.
  data = np.frombuffer(b"def add(a, b):\n  return a + b\n" * 64, np.uint8)
  for experts in (0, EXPERTS):
    lm = LMConfig(seq_len=16, hidden=32, heads=2, layers=1, ffn=32, num_experts=experts,
                  axis_name="ep")
    with jax.set_mesh(mesh):
      model = MoeLM(lm, rngs=nnx.Rngs(0))
      history = train(model, make_optimizer(model, config), data, config, steps=12,
                      place=batch_placer(mesh, "ep"))
    losses = [r["loss"] for r in history]
    assert np.mean(losses[-3:]) < 0.7 * losses[0], (experts, losses)
    counts = np.asarray(history[-1]["expert_counts"])
    if experts:
      assert counts.shape == (1, EXPERTS) and counts.sum() == 4 * 16 * K
    else:
      assert counts.size == 0
