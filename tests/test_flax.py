"""The Flax MoE layers: NNX against the reference for each dispatch, gradients, Linen == NNX, Optax;
router options, the expert bias and its update, shared experts.

Each layer call is checked against `route` + `reference_moe` (+ a jnp shared FFN) on the same
weights, computed on one device without any mesh.
"""

import contextlib
import functools
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import PartitionSpec as P

import jax_ccfuser as ccf
from jax_ccfuser import linen as ccf_linen
from jax_ccfuser import nnx as ccf_nnx
from jax_ccfuser import reference_moe, route, update_expert_bias
from models.moe_lm import LMConfig, MoeLM
from models.train import TrainConfig, batch_placer, make_optimizer, train
from moe_cases import assert_close, backward_weight_grads, ep_mesh

DEVICES = 4
HIDDEN, FFN, EXPERTS, K = 16, 24, 8, 2
# DeepSeek-V3's router and shared experts, scaled down: 4 groups of 2 experts, 2 groups a token.
DEEPSEEK = dict(score="sigmoid", num_groups=4, top_groups=2, scale=2.5, expert_bias=True,
                num_shared_experts=2)
ROUTER_OPTIONS = ("score", "num_groups", "top_groups", "scale")


def _tokens(dtype=jnp.float32, *, shape=(4, 5, HIDDEN)):
  """`[4, 5, H]`: 20 tokens, 5 per device on the 4-device mesh."""
  return jax.random.normal(jax.random.key(7), shape, jnp.float32).astype(dtype)


def _layer(**options):
  """An NNX MoE layer with the test's sizes, built under whatever mesh is set."""
  return ccf_nnx.MoE(HIDDEN, FFN, EXPERTS, k=K, axis_name="ep", rngs=nnx.Rngs(0), **options)


def _expected(layer, x, activation="swiglu"):
  """The layer's function from its weights: route + reference_moe (+ the shared FFN) on one
  device, float32."""
  spec = layer.spec
  options = {name: getattr(spec, name) for name in ROUTER_OPTIONS}
  # As host arrays: on one device whatever the layer's weights are split over.
  value = lambda variable: None if variable is None else np.asarray(variable[...])
  shared = None if layer.shared_w_in is None else (value(layer.shared_w_in),
                                                   value(layer.shared_w_out))
  return _route_and_reference(np.asarray(x), value(layer.router.kernel), value(layer.w_in),
                              value(layer.w_out), value(layer.expert_bias), shared,
                              activation=activation, options=tuple(options.items()))


@functools.partial(jax.jit, static_argnames=("activation", "options"))
def _route_and_reference(x, router_kernel, w_in, w_out, bias, shared, *, activation,
                         options=()):
  x2d = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  ids, weights, aux = route(x2d @ router_kernel, K, expert_bias=bias, **dict(options))
  y = reference_moe(x2d, ids, weights, w_in, w_out, activation=activation)
  if shared is not None:
    y = y + _swiglu_ffn(x2d, *shared)
  return y.reshape(x.shape), aux


def _swiglu_ffn(x, w_in, w_out):
  """A dense SwiGLU MLP: `x` [N, H], `w_in` [H, 2F] (gate half first), `w_out` [F, H]."""
  gate, up = jnp.split(x @ w_in, 2, axis=-1)
  return (jax.nn.silu(gate) * up) @ w_out


def _random_bias(layer, seed=3):
  """Sets the layer's expert bias to values that move some choices (zeros move none)."""
  bias = np.random.default_rng(seed).uniform(-0.2, 0.2, EXPERTS).astype(np.float32)
  layer.expert_bias[...] = jax.device_put(bias, layer.expert_bias[...].sharding)


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
  # Each device's rows: its own experts' counts (no plan), in the expert axis's order.
  owned = np.asarray(want_aux.counts).reshape(DEVICES, -1).sum(1)
  np.testing.assert_array_equal(aux.device_loads, np.stack([owned, owned]))


def test_router_options_and_shared_experts_match_reference():
  with jax.set_mesh(ep_mesh(DEVICES)):
    layer = _layer(**DEEPSEEK)
    # The shared experts and the bias are replicated; the routed experts stay split.
    assert layer.shared_w_in[...].shape == (HIDDEN, 2 * 2 * FFN)
    assert layer.shared_w_out[...].shape == (2 * FFN, HIDDEN)
    for variable in (layer.shared_w_in, layer.shared_w_out, layer.expert_bias):
      assert variable[...].sharding.is_fully_replicated, variable
    assert layer.w_in[...].sharding.spec == P("ep", None, None)
    _random_bias(layer)
    y, aux = _apply(layer, _tokens())
  want_y, want_aux = _expected(layer, _tokens())
  assert_close(y, want_y, jnp.float32)
  np.testing.assert_array_equal(aux.counts, want_aux.counts)
  np.testing.assert_allclose(aux.load_balancing_loss, want_aux.load_balancing_loss, rtol=1e-5)
  # The options matter: without the bias other experts are chosen, and without the shared
  # experts the output differs.
  layer.expert_bias[...] = jnp.zeros_like(layer.expert_bias[...])
  assert not np.array_equal(_expected(layer, _tokens())[1].counts, want_aux.counts)
  layer.shared_w_in[...] = jnp.zeros_like(layer.shared_w_in[...])
  assert float(jnp.abs(_expected(layer, _tokens())[0] - want_y).max()) > 1e-2


@pytest.mark.slow
def test_reassign_flag_balances_devices_and_keeps_the_function():
  # Tokens shifted off-centre so the router favours a few experts.
  x = _tokens(shape=(8, 16, HIDDEN)) + 2.0
  with jax.set_mesh(ep_mesh(DEVICES)):
    plain, plain_aux = _apply(_layer(), x)
    moved, aux = _apply(_layer(reassign=True), x)
    grads = [nnx.state(nnx.jit(nnx.grad(_objective))(_layer(reassign=r), x), nnx.Param)
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


@pytest.mark.parametrize("check_vma", [True, False])
def test_inside_a_users_shard_map_over_a_data_axis_too(check_vma):
  """The user's shard_map splits the tokens over (data, ep), each data index an expert-parallel
  group: the aux is still the whole batch's, the same on every device (out_specs P() checks
  that it is typed so), as the expert bias's update needs to stay replicated. It once covered
  one data index's tokens, and still did under check_vma=False (no varying axes to read)."""
  mesh = jax.make_mesh((2, DEVICES), ("data", "ep"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  x = _tokens(shape=(4, 6, HIDDEN))
  with jax.set_mesh(mesh):
    layer = _layer(reassign=True)
    graphdef, state = nnx.split(layer)
    body = lambda state, x: nnx.merge(graphdef, state)(x)
    mapped = jax.shard_map(body, in_specs=(nnx.get_partition_spec(state), P(None, ("data", "ep"))),
                           out_specs=(P(None, ("data", "ep")), P()), check_vma=check_vma)
    y, aux = jax.jit(mapped)(state, x.reshape(4 * 6, HIDDEN)[None])
  want_y, want_aux = _expected(layer, x)
  assert_close(y.reshape(x.shape), want_y, jnp.float32)
  np.testing.assert_array_equal(aux.counts, want_aux.counts)
  np.testing.assert_allclose(aux.load_balancing_loss, want_aux.load_balancing_loss, rtol=1e-5)
  np.testing.assert_allclose(aux.z_loss, want_aux.z_loss, rtol=1e-5)
  np.testing.assert_array_equal(aux.device_loads.sum(1), [24 * K, 24 * K])


def test_a_training_step_under_strict_dtype_promotion():
  """jax.numpy_dtype_promotion("strict") is the caller's choice for its own code: the layer,
  its reassignment and the bias update run under it as under the standard rules."""
  x = _tokens() + 2.0
  results = []
  for promotion in ("standard", "strict"):
    with jax.set_mesh(ep_mesh(DEVICES)), jax.numpy_dtype_promotion(promotion):
      layer = _layer(reassign=True, **DEEPSEEK)
      _random_bias(layer)
      loss, grads = nnx.jit(nnx.value_and_grad(_objective))(layer, x)
      _, aux = _apply(layer, x)
      bias = update_expert_bias(layer.expert_bias[...], aux.counts, rate=1e-3)
    results.append((loss, nnx.state(grads, nnx.Param), bias))
  jax.tree.map(np.testing.assert_array_equal, *results)


def test_bfloat16_compute():
  with jax.set_mesh(ep_mesh(DEVICES)):
    layer = _layer(dtype=jnp.bfloat16, activation="gelu")
    assert layer.w_in[...].dtype == jnp.float32  # stored in param_dtype
    assert layer.w_in[...].shape == (EXPERTS, HIDDEN, FFN)  # not gated: [E, H, F]
    y, aux = _apply(layer, _tokens())
  assert y.dtype == jnp.bfloat16
  want_y, want_aux = _expected(layer, _tokens(), activation="gelu")
  assert_close(y, want_y, jnp.bfloat16)
  # The router runs in float32 whatever the compute dtype: its losses as the float32 model's.
  np.testing.assert_allclose(aux.z_loss, want_aux.z_loss, rtol=1e-5)


def test_expert_weights_start_at_fan_in_scale():
  """Each expert's w_in [H, F] and w_out [F, H] with variance 1 / fan-in (H, then F): the expert
  axis counts toward neither fan (3072 draws each: the standard deviations within 6%, where
  the other fan would be 18% off)."""
  layer = ccf_nnx.MoE(HIDDEN, FFN, EXPERTS, k=K, axis_name=None, activation="gelu",
                      rngs=nnx.Rngs(3))
  np.testing.assert_allclose(np.std(layer.w_in[...]), HIDDEN ** -0.5, rtol=0.06)
  np.testing.assert_allclose(np.std(layer.w_out[...]), FFN ** -0.5, rtol=0.06)


def test_bad_options():
  with pytest.raises(ValueError, match="capacity_factor applies to dispatch='all_to_all'"):
    _layer(capacity_factor=1.25)
  with pytest.raises(ValueError, match="hidden=16 and ffn=0 must both be at least 1"):
    ccf_nnx.MoE(HIDDEN, 0, EXPERTS, axis_name=None, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="hidden=16 and ffn=0 must both be at least 1"):
    ccf_linen.MoE(num_experts=EXPERTS, ffn=0, axis_name=None).init(jax.random.key(0), _tokens())
  # When the layer is built, not at its first call.
  for factor in (0.0, True):  # the op's own check: True is no capacity factor
    with pytest.raises(ValueError, match="capacity_factor must be a positive float or None"):
      _layer(dispatch="all_to_all", capacity_factor=factor)
  with pytest.raises(ValueError, match="replicas=-1 must be 0 or positive"):
    _layer(reassign=True, replicas=-1)
  with pytest.raises(ValueError, match="replicas must be an int, got 1.0"):
    _layer(reassign=True, replicas=1.0)
  with pytest.raises(ValueError, match="num_experts must be a positive int, got 0"):
    ccf_nnx.MoE(HIDDEN, FFN, 0, axis_name=None, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown score 'relu'"):
    _layer(score="relu")
  with pytest.raises(ValueError, match="num_groups=3 must be positive and divide"):
    _layer(num_groups=3)
  with pytest.raises(ValueError, match="top_groups=1 groups of 1"):
    _layer(num_groups=8, top_groups=1)
  with pytest.raises(ValueError, match="num_shared_experts=-1 must be 0 or positive"):
    _layer(num_shared_experts=-1)
  for shared in (1.0, True):
    with pytest.raises(ValueError, match=f"num_shared_experts must be an int, got {shared}"):
      _layer(num_shared_experts=shared)
  with pytest.raises(ValueError, match="unknown dispatch"):
    _layer(dispatch="nccl")
  with pytest.raises(ValueError, match=r"residuals must be one of \('inputs', 'hidden', "):
    _layer(residuals="keep")
  with pytest.raises(ValueError, match="residuals='hidden' needs dispatch='fused'"):
    _layer(dispatch="all_to_all", residuals="hidden")
  with pytest.raises(ValueError, match="not the expert axis 'expert'"):
    with jax.set_mesh(ep_mesh(DEVICES)):
      ccf_nnx.MoE(HIDDEN, FFN, EXPERTS, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="do not split evenly"):
    with jax.set_mesh(ep_mesh(DEVICES)):
      _layer()(_tokens(shape=(1, 3, HIDDEN)))
  # No tokens: XLA failed to compile the empty shard_map with an internal error.
  with pytest.raises(ValueError, match=r"no tokens: on a mesh the layer needs at least one token "):
    with jax.set_mesh(ep_mesh(DEVICES)):
      _layer()(_tokens(shape=(0, 8, HIDDEN)))
  # Before JAX places the weights (its IndivisibleError names no option of the layer).
  uneven = r"num_experts=6 does not split evenly over the mesh's expert axis 'ep' of size 4"
  with jax.set_mesh(ep_mesh(DEVICES)):
    with pytest.raises(ValueError, match=uneven):
      ccf_nnx.MoE(HIDDEN, FFN, 6, axis_name="ep", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=uneven):
      ccf_linen.MoE(num_experts=6, ffn=FFN, axis_name="ep").init(jax.random.key(0), _tokens())
  # Made under an explicit mesh, called without one: the layer says to set the mesh again.
  explicit = jax.make_mesh((DEVICES,), ("ep",), devices=jax.devices()[:DEVICES],
                           axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(explicit):
    layer = _layer()
  with pytest.raises(ValueError, match=r"the layer's experts are split over the explicit mesh "
                                       r"axes \['ep'\] .*call the layer under that mesh too"):
    layer(_tokens())
  # Made under an auto mesh, called without one: it runs as on one device, and says so.
  with jax.set_mesh(ep_mesh(DEVICES)):
    layer = _layer()
  with pytest.warns(RuntimeWarning, match=r"placed over the mesh axis 'ep' when it was made, but "
                                          r"it is called where no mesh is set"):
    nnx.jit(lambda layer, x: layer(x))(layer, _tokens())
  with warnings.catch_warnings(), jax.set_mesh(ep_mesh(DEVICES)):
    warnings.filterwarnings("error", message=".*called where no mesh is set")
    nnx.jit(lambda layer, x: layer(x))(layer, _tokens())


def _objective(layer, x):
  """A loss touching every output and both auxiliaries, so every parameter gets a gradient."""
  y, aux = layer(x)
  return jnp.sum(jnp.sin(y)) + aux.load_balancing_loss + 0.1 * aux.z_loss


@pytest.mark.parametrize("dispatch,options", [("fused", {}), ("all_to_all", {}),
                                              ("fused", DEEPSEEK)])
def test_gradients_reach_router_and_experts(dispatch, options):
  with jax.set_mesh(ep_mesh(DEVICES)):
    layer = _layer(dispatch=dispatch, **options)
    if layer.expert_bias is not None:
      _random_bias(layer)
    grads = nnx.jit(nnx.grad(_objective))(layer, _tokens())
  local = ccf_nnx.MoE(HIDDEN, FFN, EXPERTS, k=K, dispatch="reference", axis_name=None,
                      rngs=nnx.Rngs(0), **options)
  if local.expert_bias is not None:
    _random_bias(local)
  want = nnx.jit(nnx.grad(_objective))(local, _tokens())
  got, want = nnx.to_pure_dict(grads), nnx.to_pure_dict(want)
  # Parameters only: the expert bias is no nnx.Param, so it gets no gradient.
  params = {"router", "w_in", "w_out"} | ({"shared_w_in", "shared_w_out"} if options else set())
  assert set(got) == set(want) == params
  for path in [("router", "kernel")] + [(p,) for p in params - {"router"}]:
    g, w = functools.reduce(dict.__getitem__, path, got), functools.reduce(dict.__getitem__,
                                                                          path, want)
    assert float(jnp.abs(g).max()) > 0, path
    assert_close(g, w, jnp.float32)


def test_router_alone_trained_skips_the_experts_weight_gradients():
  """Fine-tuning the router of frozen experts (`nnx.DiffState` of the router's parameters):
  the fused backward computes no expert weight gradients, and the router's gradient is the
  full backward's, bitwise."""
  with jax.set_mesh(ep_mesh(DEVICES)):
    layer = _layer()
    graph, state = nnx.split(layer)
    router = nnx.DiffState(0, nnx.All(nnx.Param, nnx.PathContains("router")))

    def grads(wrt):
      return jax.jit(lambda state, x: nnx.grad(_objective, argnums=wrt)(nnx.merge(graph, state),
                                                                         x))
    frozen, full = grads(router), grads(0)
    text = frozen.lower(state, _tokens()).as_text()
    assert backward_weight_grads(text) == [0]
    got, want = nnx.to_pure_dict(frozen(state, _tokens())), nnx.to_pure_dict(full(state,
                                                                                  _tokens()))
  assert set(got) == {"router"}
  np.testing.assert_array_equal(got["router"]["kernel"], want["router"]["kernel"])
  assert float(jnp.abs(want["router"]["kernel"]).max()) > 0


def _op_names(hlo: str, opcode: str) -> list[str]:
  """The `op_name`s (what profilers show) of a compiled program's instructions of `opcode`."""
  return re.findall(rf" {opcode}\(.*op_name=\"([^\"]+)\"", hlo)


@pytest.mark.parametrize("dispatch", ["fused", "all_to_all"])
def test_profiles_name_the_layers_parts(dispatch):
  # In a profile of a many-layer model the custom calls and GEMMs are otherwise anonymous:
  # `.../shard_map/ffi_call` forward and backward alike.
  with jax.set_mesh(ep_mesh(DEVICES)):
    layer = _layer(dispatch=dispatch, **DEEPSEEK)
    graph, state = nnx.split(layer)
    step = jax.jit(lambda state, x: nnx.grad(_objective)(nnx.merge(graph, state), x))
    hlo = step.lower(state, _tokens()).compile().as_text()
  calls, dots = _op_names(hlo, "custom-call"), _op_names(hlo, "dot")
  if dispatch == "fused":  # its GEMMs run inside its custom calls
    assert {n for n in calls if "ffi_call" in n} == {
        "jit(<lambda>)/jvp()/shard_map/fused_moe/ffi_call",
        "jit(<lambda>)/transpose(jvp())/shard_map/fused_moe/ffi_call"}, calls
  else:
    assert any("/jvp()/shard_map/all_to_all_moe/" in n for n in dots), dots
    assert any("/transpose(jvp())/shard_map/all_to_all_moe/" in n for n in dots), dots
  assert any("/shared_experts/" in n for n in dots), dots
  assert [n for n in calls if n.endswith("top_k")] and all(
      "/route/" in n for n in calls if n.endswith("top_k")), calls


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
@pytest.mark.parametrize("dispatch,axis_name", [("fused", "ep"), ("all_to_all", "ep"),
                                                ("reference", "ep"), ("fused", None)])
def test_a_data_axis_splits_the_tokens_too(dispatch, axis_name, axis_type):
  """On a (data, ep) mesh of 2 x 4 devices (explicit axes, jax.make_mesh's default, or auto)
  the tokens split over both axes, each data index an expert-parallel group of its own; with no
  expert axis each device runs every expert on its own tokens. The outputs, gradients and
  whole-batch aux are those of one device."""
  kind = getattr(jax.sharding.AxisType, axis_type)
  mesh = jax.make_mesh((2, DEVICES), ("data", "ep"), axis_types=(kind, kind))
  x = _tokens(shape=(4, 6, HIDDEN))  # 24 tokens, 3 a device
  fused = dispatch == "fused"
  with jax.set_mesh(mesh):
    layer = ccf_nnx.MoE(HIDDEN, FFN, EXPERTS, k=K, axis_name=axis_name, dispatch=dispatch,
                        reassign=fused, rngs=nnx.Rngs(0))
    x_data = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("data")))
    y, aux = _apply(layer, x_data)
    grads = nnx.to_pure_dict(nnx.jit(nnx.grad(_objective))(layer, x_data))
  want_y, want_aux = _expected(layer, x)
  assert_close(y, want_y, jnp.float32)
  np.testing.assert_array_equal(aux.counts, want_aux.counts)
  np.testing.assert_allclose(aux.load_balancing_loss, want_aux.load_balancing_loss, rtol=1e-5)
  np.testing.assert_allclose(aux.z_loss, want_aux.z_loss, rtol=1e-5)
  # Both groups' rows, without and with the plan: every (token, k) pair once.
  np.testing.assert_array_equal(aux.device_loads.sum(1), [24 * K, 24 * K])
  local = ccf_nnx.MoE(HIDDEN, FFN, EXPERTS, k=K, dispatch="reference", axis_name=None,
                      rngs=nnx.Rngs(0))
  want = nnx.to_pure_dict(nnx.jit(nnx.grad(_objective))(local, x))
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    assert float(jnp.abs(g).max()) > 0
    assert_close(g, w, jnp.float32)


@pytest.mark.parametrize("dispatch", ["fused", "all_to_all"])
def test_a_size_one_axis_beside_the_expert_axis(dispatch):
  """A mesh whose other axes have size 1 ((data, ep) = (1, 4), or a pipeline axis of 1 after
  the expert axis) is one expert-parallel group: the layer (with reassignment for fused) and a
  user's shard_map that names only the expert axis in its out_specs give one device's result.
  The size-1 axes once typed fused's results as varying over them, which shard_map refused."""
  x = _tokens()
  for shape, names in [((1, DEVICES), ("data", "ep")), ((DEVICES, 1), ("ep", "pipe"))]:
    mesh = jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * 2,
                         devices=jax.devices()[:DEVICES])
    with jax.set_mesh(mesh):
      layer = _layer(dispatch=dispatch, reassign=dispatch == "fused")
      y, aux = _apply(layer, x)
    want_y, want_aux = _expected(layer, x)
    assert_close(y, want_y, jnp.float32)
    np.testing.assert_array_equal(aux.counts, want_aux.counts)
    ids, weights, _ = route(x.reshape(-1, HIDDEN) @ layer.router.kernel[...], K)
    w_in, w_out = np.asarray(layer.w_in[...]), np.asarray(layer.w_out[...])
    moe = ccf.fused_moe if dispatch == "fused" else ccf.all_to_all_moe
    mapped = jax.jit(jax.shard_map(functools.partial(moe, axis_name="ep"), mesh=mesh,
                                   in_specs=P("ep"), out_specs=P("ep")))
    assert_close(mapped(x.reshape(-1, HIDDEN), ids, weights, w_in, w_out),
                 reference_moe(x.reshape(-1, HIDDEN), ids, weights, w_in, w_out), jnp.float32)


@pytest.mark.parametrize("dispatch", ["fused", "all_to_all"])
def test_explicit_axes_take_x_split_along_any_dimension_and_return_y_alike(dispatch):
  """On explicit axes x may come split over its batch, its sequence or both, in any order: y
  comes back with x's sharding (so a residual x + y type-checks) and one device's values. The
  layer once reshaped x before resharding it (JAX refused the reshape of a sequence split) and
  gave y the flattened tokens' split."""
  explicit = jax.sharding.AxisType.Explicit
  x = _tokens(shape=(4, 8, HIDDEN))
  for shape, names, spec in [((DEVICES,), ("ep",), P(None, "ep")),
                             ((2, 2), ("data", "ep"), P("data", "ep")),
                             ((2, 2), ("data", "ep"), P("ep", "data")),
                             ((2, 2), ("data", "ep"), P(None, ("data", "ep")))]:
    mesh = jax.make_mesh(shape, names, axis_types=(explicit,) * len(shape),
                         devices=jax.devices()[:DEVICES])
    with jax.set_mesh(mesh):
      layer = _layer(dispatch=dispatch)
      x_split = jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
      residual = nnx.jit(lambda layer, x: x + layer(x)[0])(layer, x_split)
    assert jax.typeof(residual).sharding.spec == jax.typeof(x_split).sharding.spec, spec
    want_y, _ = _expected(layer, x)
    assert_close(residual, x + want_y, jnp.float32)


def test_a_mesh_of_mixed_axis_types_is_refused_by_name():
  """Explicit and Auto axes in one mesh: the Linen layer's init placed its weights by one rule
  and failed inside JAX or Flax (NNX refuses such meshes in Flax itself)."""
  auto, explicit = jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit
  for kinds in ((explicit, auto), (auto, explicit)):
    mesh = jax.make_mesh((2, DEVICES), ("data", "ep"), axis_types=kinds)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="all Explicit or all Auto; got "
                                                           r"\{'data': '\w+', 'ep': '\w+'\}"):
      jax.jit(ccf_linen.MoE(num_experts=EXPERTS, ffn=FFN, k=K, axis_name="ep").init)(
          jax.random.key(0), _tokens(shape=(16, HIDDEN)))


def test_a_shard_map_manual_over_another_axis_only_is_refused_by_name():
  """Inside a user's shard_map manual over the data axis alone the expert axis is left to the
  layer, whose own shard_map would bind the data axis again: XLA's verifier refused it while
  lowering; the layer says what to change."""
  mesh = jax.make_mesh((2, DEVICES), ("data", "ep"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    layer = _layer()
    graph, state = nnx.split(layer)
    body = lambda state, x: nnx.merge(graph, state)(x)[0]
    mapped = jax.shard_map(body, in_specs=(P(), P("data")), out_specs=P("data"),
                           axis_names={"data"})
    with pytest.raises(ValueError, match=r"manual over \('data',\) but not over its expert axis "
                                         r"'ep': make that shard_map manual over 'ep' too"):
      jax.jit(mapped)(state, _tokens(shape=(16, HIDDEN)))


@pytest.mark.parametrize("dispatch", ["fused", "all_to_all"])
def test_explicit_axes_differentiate_an_x_made_off_the_mesh(dispatch):
  """An x made outside the mesh (a plain array) on explicit axes: the layer's reshapes, whose
  transposes need it on the mesh, take it there, and the gradients of x and of every parameter
  are one device's (without the layer taking it there, JAX's transpose failed)."""
  explicit = jax.sharding.AxisType.Explicit
  mesh = jax.make_mesh((2, 2), ("data", "ep"), axis_types=(explicit,) * 2,
                       devices=jax.devices()[:DEVICES])
  x = _tokens()
  grad = nnx.jit(nnx.grad(_objective, argnums=(0, 1)))
  with jax.set_mesh(mesh):
    got = grad(_layer(dispatch=dispatch), x)
  want = grad(ccf_nnx.MoE(HIDDEN, FFN, EXPERTS, k=K, dispatch="reference", axis_name=None,
                          rngs=nnx.Rngs(0)), x)
  for g, w in zip(jax.tree.leaves(nnx.to_pure_dict(got[0])) + [got[1]],
                  jax.tree.leaves(nnx.to_pure_dict(want[0])) + [want[1]], strict=True):
    assert float(jnp.abs(g).max()) > 0
    assert_close(g, w, jnp.float32)


def test_stacked_layers_under_scan_equal_the_layers_one_by_one():
  """Layers made by nnx.vmap (their experts split over the expert axis after the layer axis)
  and run by nnx.scan, as large models stack them, give what each layer gives on its own."""
  layers_n = 3
  with jax.set_mesh(ep_mesh(DEVICES)):
    @nnx.split_rngs(splits=layers_n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
    def make(rngs):
      return ccf_nnx.MoE(HIDDEN, FFN, EXPERTS, k=K, axis_name="ep", rngs=rngs)

    stacked = make(nnx.Rngs(0))
    assert stacked.w_in[...].sharding.spec == P(None, "ep")

    @nnx.jit
    def scanned(stacked, x):
      @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
      def step(layer, x):
        return x + layer(x)[0]
      return step(stacked, x)

    y = scanned(stacked, _tokens())
    graphdef, state = nnx.split(stacked)
    want = _tokens()
    for i in range(layers_n):
      layer = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
      want = want + _apply(layer, want)[0]
  assert_close(y, want, jnp.float32)


def test_linen_layers_stacked_by_scan_with_remat_match_the_reference():
  """Linen's way to stack layers: nn.scan over a rematerialised block, the experts' partitioning
  metadata given its stacked axis (metadata_params). Loss and every gradient as the reference
  dispatch gives them."""
  layers_n = 2

  class Block(nn.Module):
    dispatch: str

    @nn.compact
    def __call__(self, x, _):
      y, aux = ccf_linen.MoE(num_experts=EXPERTS, ffn=FFN, k=K, axis_name="ep",
                             dispatch=self.dispatch, name="moe")(x)
      return x + y, aux.load_balancing_loss

  class Stack(nn.Module):
    dispatch: str

    @nn.compact
    def __call__(self, x):
      layers = nn.scan(nn.remat(Block), variable_axes={"params": 0},
                       split_rngs={"params": True}, length=layers_n,
                       metadata_params={nn.PARTITION_NAME: None})
      x, aux = layers(self.dispatch, name="layers")(x, None)
      return jnp.mean(x ** 2) + 1e-2 * jnp.sum(aux)

  with jax.set_mesh(ep_mesh(DEVICES)):
    x = _tokens()
    params = nn.meta.unbox(jax.jit(Stack("fused").init)(jax.random.key(0), x))
    assert tuple(params["params"]["layers"]["moe"]["w_in"].sharding.spec)[:2] == (None, "ep")
    got, want = (jax.jit(jax.value_and_grad(Stack(dispatch).apply))(params, x)
                 for dispatch in ("fused", "reference"))
  assert_close(got[0], want[0], jnp.float32)
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
    assert_close(a, b, jnp.float32, max(1.0, float(jnp.max(jnp.abs(b))) / 4))


def test_kept_residuals_change_nothing():
  # The layer's residuals option reaches fused_moe: keeping each row's hidden activation gives
  # bitwise the gradients of recomputing it, and the kept rows show up in the traced program.
  x = _tokens()
  grads = {}
  with jax.set_mesh(ep_mesh(DEVICES)):
    for residuals in ("inputs", "hidden"):
      layer = _layer(residuals=residuals)
      step = nnx.jit(nnx.grad(_objective))
      grads[residuals] = nnx.to_pure_dict(step(layer, x))
      kept = f"tensor<1x{2 * FFN}xf32>" not in step.lower(layer, x).as_text()
      assert kept == (residuals == "hidden"), residuals
  jax.tree.map(np.testing.assert_array_equal, grads["inputs"], grads["hidden"])


def test_expert_bias_evens_out_the_load_without_the_aux_loss():
  # A skewed router, a task loss alone (no load-balancing loss), SGD on the parameters and the
  # bias stepped from each step's counts: the busiest expert's load falls towards the mean.
  rate, steps = 0.02, 12
  x = _tokens(shape=(8, 16, HIDDEN)) + 0.5
  with jax.set_mesh(ep_mesh(DEVICES)):
    layer = _layer(expert_bias=True)
    optimizer = nnx.Optimizer(layer, optax.sgd(1e-2, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def train_step(layer, optimizer, x):
      (_, aux), grads = nnx.value_and_grad(lambda m: (jnp.mean(jnp.sin(m(x)[0])), m(x)[1]),
                                           has_aux=True)(layer)
      optimizer.update(layer, grads)
      layer.expert_bias[...] = update_expert_bias(layer.expert_bias[...], aux.counts, rate=rate)
      return aux.counts

    counts = [np.asarray(train_step(layer, optimizer, x)) for _ in range(steps)]
    assert layer.expert_bias[...].sharding.is_fully_replicated
  # The optimizer holds no state for the bias; the bias moved by the rule alone.
  momentum = nnx.to_pure_dict(nnx.state(optimizer))["opt_state"][0]["trace"]
  assert set(momentum) == {"router", "w_in", "w_out"}
  mean = 8 * 16 * K / EXPERTS
  np.testing.assert_allclose(
      layer.expert_bias[...], rate * np.sign(mean - np.asarray(counts)).sum(0), atol=1e-6)
  imbalance = np.max(counts, axis=1) / mean
  assert imbalance[0] > 2 and imbalance[-3:].max() < 1.4, imbalance


@pytest.mark.parametrize("on_mesh,options", [(False, {}), (True, {}), (False, DEEPSEEK),
                                              (True, DEEPSEEK)])
def test_linen_equals_nnx(on_mesh, options):
  # Like Flax's TestLinenConsistency: the same weights in both layers give the same outputs.
  mesh = ep_mesh(DEVICES)
  with jax.set_mesh(mesh) if on_mesh else contextlib.nullcontext():
    layer = _layer(dispatch="fused", **options)
    twin = ccf_linen.MoE(num_experts=EXPERTS, ffn=FFN, k=K, axis_name="ep", dispatch="fused",
                         **options)
    boxed = twin.init(jax.random.key(1), _tokens())
    # Same tree, shapes and partitioning as the NNX layer.
    nnx_params = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
    linen_params = nn.unbox(boxed)["params"]
    assert (jax.tree.map(jnp.shape, linen_params) == jax.tree.map(jnp.shape, nnx_params))
    specs = nn.get_partition_spec(boxed)["params"]
    assert specs["w_in"] == specs["w_out"] == P("ep", None, None)
    if on_mesh:  # stored split, not only once unboxed (every device once held every expert)
      assert boxed["params"]["w_in"].value.sharding.spec == P("ep", None, None)
    variables = {"params": nnx_params}
    if options:
      assert specs["shared_w_in"] == specs["shared_w_out"] == P(None, None)
      np.testing.assert_array_equal(boxed["expert_bias"]["expert_bias"], np.zeros(EXPERTS))
      _random_bias(layer)
      variables["expert_bias"] = nnx.to_pure_dict(nnx.state(layer, ccf_nnx.ExpertBias))
    assert set(boxed) == set(variables)
    y_nnx, aux_nnx = _apply(layer, _tokens())
    y_linen, aux_linen = jax.jit(twin.apply)(variables, _tokens())
  np.testing.assert_array_equal(y_linen, y_nnx)
  jax.tree.map(np.testing.assert_array_equal, aux_linen, aux_nnx)


def test_linen_layer_takes_keywords_only():
  """The NNX layer's positions are (hidden, ffn, num_experts): copied to the Linen layer's old
  (num_experts, ffn, k) they made hidden the expert count and the expert count k, silently, so
  it refuses positions."""
  with pytest.raises(TypeError, match="positional"):
    ccf_linen.MoE(HIDDEN, FFN, EXPERTS)


def test_linen_layer_on_an_explicit_mesh():
  """jax.make_mesh's default axes are Explicit: there the Linen layer initialises with its
  experts split over the expert axis and computes what it does on an Auto mesh (Flax's boxes
  assert their sharding, which an unplaced init did not have)."""
  twin = ccf_linen.MoE(num_experts=EXPERTS, ffn=FFN, k=K, axis_name="ep", dispatch="fused",
                       **DEEPSEEK)
  results = []
  for axis_type in (jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit):
    mesh = jax.make_mesh((DEVICES,), ("ep",), axis_types=(axis_type,),
                         devices=jax.devices()[:DEVICES])
    with jax.set_mesh(mesh):
      boxed = jax.jit(twin.init)(jax.random.key(1), _tokens())
      split = jax.sharding.NamedSharding(mesh, P("ep", None, None))
      assert boxed["params"]["w_in"].value.sharding.is_equivalent_to(split, 3)
      results.append(jax.jit(twin.apply)(boxed, _tokens()))
  (y_auto, aux_auto), (y_explicit, aux_explicit) = results  # the same up to XLA's partitioning
  assert_close(y_explicit, y_auto, jnp.float32)
  np.testing.assert_array_equal(aux_explicit.counts, aux_auto.counts)


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


@pytest.mark.parametrize("options", [dict(reassign=True, **DEEPSEEK), dict(dispatch="all_to_all"),
                                     dict(dispatch="reference")],
                         ids=["fused-reassign-deepseek", "all_to_all", "reference"])
def test_strict_rank_promotion_is_the_users_alone(options):
  """`jax_numpy_rank_promotion='raise'` governs the user's code: the library's broadcasts (the
  router's groups and bias, reassign's cuts, the layer's own) trace as NumPy's, and the layer's
  loss, gradients, aux and bias update are bitwise those under the default."""
  x = _tokens()

  def step(layer, x):
    def loss(layer):
      y, aux = layer(x)
      return jnp.sum(y ** 2) + aux.load_balancing_loss, aux
    (value, aux), grads = nnx.value_and_grad(loss, has_aux=True)(layer)
    bias = update_expert_bias(jnp.zeros(EXPERTS), aux.counts, rate=1e-3)
    ids = jnp.argsort(layer.router(x.reshape(-1, HIDDEN)), -1)[:, -K:].astype(jnp.int32)
    stats = ccf.placement.routing_stats([ids, ids[:, ::-1]], num_experts=EXPERTS,
                                        num_devices=DEVICES)
    return value, grads, aux, bias, stats

  results = []
  for promotion in ("allow", "raise"):
    with jax.set_mesh(ep_mesh(DEVICES)), jax.numpy_rank_promotion(promotion):
      results.append(jax.tree.map(np.asarray, nnx.jit(step)(_layer(**options), x)))
  jax.tree.map(np.testing.assert_array_equal, *results)


_BRIDGED = """
import sys
import jax.numpy as jnp
from flax import linen as nn, nnx
from flax.nnx import bridge

class Other(nn.Module):  # another library's collection of the same name, bridged first
  @nn.compact
  def __call__(self, x):
    return x + self.variable("expert_bias", "b", jnp.zeros, ()).value

bridge.lazy_init(bridge.ToNNX(Other(), rngs=nnx.Rngs(0)), jnp.ones(2))
from jax_ccfuser import linen as ccf_linen
layer = bridge.ToNNX(ccf_linen.MoE(num_experts=4, ffn=8, axis_name=None, expert_bias=True),
                     rngs=nnx.Rngs(0))
bridge.lazy_init(layer, jnp.ones((2, 16)))
from jax_ccfuser import nnx as ccf_nnx, placement
selected = nnx.to_flat_state(nnx.state(layer, ccf_nnx.ExpertBias))
assert [path for path, _ in selected] == [("expert_bias",)], selected
assert not nnx.state(layer, nnx.Param).get("expert_bias"), "a parameter: gradients would move it"
assert callable(placement.moe_layers) and "moe_layers" in dir(placement)
namespace = {}
exec("from jax_ccfuser.nnx import *; from jax_ccfuser.linen import *", namespace)
assert sorted(k for k in namespace if not k.startswith("__")) == ["ExpertBias", "MoE", "MoEAux"]
"""


def test_bridged_linen_bias_is_an_expert_bias_whatever_was_imported_first():
  """`nnx.bridge` named the Linen layer's bias collection with a type of its own when only
  `jax_ccfuser.linen` was imported (and a later `import jax_ccfuser.nnx` failed on the name
  taken); in a fresh process, as import order is the point."""
  import subprocess, sys
  run = subprocess.run([sys.executable, "-c", _BRIDGED], capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
