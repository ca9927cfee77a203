"""route: top-k ids and weights, the auxiliary losses against numpy, gradients, pmean; the router
options (sigmoid scores, expert groups, scale, expert bias) and the bias update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from flax import nnx
from jax.test_util import check_grads

from jax_ccfuser import nnx as ccf_nnx
from jax_ccfuser import route, update_expert_bias
from moe_cases import ep_mesh


def _logits(tokens, experts, *, seed):
  # Spread out so that small perturbations never change the top-k choice.
  rng = np.random.default_rng(seed)
  return jnp.asarray(3 * rng.standard_normal((tokens, experts)), jnp.float32)


def _numpy_route(logits, k):
  """Independent float64 top-k, load-balancing loss, z-loss and counts."""
  logits = np.asarray(logits, np.float64)
  t, e = logits.shape
  probs = np.exp(logits - logits.max(axis=1, keepdims=True))
  probs /= probs.sum(axis=1, keepdims=True)
  ids = np.argsort(-probs, axis=1, kind="stable")[:, :k]
  counts = np.bincount(ids.ravel(), minlength=e)
  load_balancing = e * np.sum(counts / (t * k) * probs.mean(axis=0))
  lse = np.log(np.exp(logits).sum(axis=1))
  return ids, np.take_along_axis(probs, ids, axis=1), load_balancing, np.mean(lse ** 2), counts


def test_hand_computed_losses():
  # Equal logits: every probability is 1/4 and top-1 ties go to expert 0, so f = [1, 0, 0, 0],
  # P = [1/4] * 4, load balancing = 4 * (1 * 1/4) = 1 and z = log(4 * e^2)^2 = (2 + log 4)^2;
  # the weight is the raw 1/4 (k = 1 is not rescaled by default).
  ids, weights, aux = route(jnp.full((3, 4), 2.0), 1)
  np.testing.assert_array_equal(ids, np.zeros((3, 1)))
  np.testing.assert_allclose(weights, 0.25, rtol=1e-6)
  np.testing.assert_allclose(aux.load_balancing_loss, 1.0, rtol=1e-6)
  np.testing.assert_allclose(aux.z_loss, (2 + np.log(4)) ** 2, rtol=1e-6)
  np.testing.assert_array_equal(aux.counts, [3, 0, 0, 0])
  # Two tokens, two experts, k=1: p = softmax([log 3, 0]) = [3/4, 1/4] for both tokens, so
  # f = [1, 0], P = [3/4, 1/4], load balancing = 2 * 3/4 = 3/2, z = log(4)^2.
  _, weights, aux = route(jnp.log(jnp.array([[3.0, 1.0], [3.0, 1.0]])), 1, renormalize=False)
  np.testing.assert_allclose(weights, 0.75, rtol=1e-6)
  np.testing.assert_allclose(aux.load_balancing_loss, 1.5, rtol=1e-6)
  np.testing.assert_allclose(aux.z_loss, np.log(4) ** 2, rtol=1e-6)


@pytest.mark.parametrize("tokens,experts,k", [(7, 8, 1), (9, 6, 2), (5, 16, 4)])
def test_matches_numpy(tokens, experts, k):
  logits = _logits(tokens, experts, seed=tokens)
  ids, weights, aux = route(logits, k, renormalize=False)
  want_ids, want_weights, want_lb, want_z, want_counts = _numpy_route(logits, k)
  assert ids.dtype == jnp.int32 and ids.shape == (tokens, k)
  assert weights.dtype == jnp.float32 and weights.shape == (tokens, k)
  assert aux.counts.dtype == jnp.int32 and aux.counts.shape == (experts,)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(weights, want_weights, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(aux.load_balancing_loss, want_lb, rtol=1e-5)
  np.testing.assert_allclose(aux.z_loss, want_z, rtol=1e-5)
  np.testing.assert_array_equal(aux.counts, want_counts)


def test_renormalize():
  logits = _logits(11, 8, seed=1)
  ids, weights, _ = route(logits, 3)
  ids_raw, weights_raw, _ = route(logits, 3, renormalize=False)
  np.testing.assert_array_equal(ids, ids_raw)
  np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)
  assert np.all(weights_raw.sum(axis=1) < 1 - 1e-4)
  np.testing.assert_allclose(weights, weights_raw / weights_raw.sum(axis=1, keepdims=True),
                             rtol=1e-6)


def test_bfloat16_logits_computed_in_float32():
  logits = _logits(6, 8, seed=2).astype(jnp.bfloat16)
  ids, weights, aux = route(logits, 2, renormalize=False)
  want_ids, want_weights, want_lb, want_z, _ = _numpy_route(logits.astype(jnp.float32), 2)
  assert weights.dtype == jnp.float32 and aux.z_loss.dtype == jnp.float32
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(weights, want_weights, rtol=1e-5)
  np.testing.assert_allclose(aux.load_balancing_loss, want_lb, rtol=1e-5)
  np.testing.assert_allclose(aux.z_loss, want_z, rtol=1e-5)


def test_one_expert_per_token_keeps_the_raw_score_so_the_output_trains_the_router():
  """k = 1 rescaled gives every token the weight 1, whatever its logits: no gradient of the
  layer's output reached the router (a top-1 model's router learnt from the auxiliary losses
  alone). The default keeps the raw score there, as Switch Transformers do; k > 1 rescales."""
  logits = jnp.asarray(_logits(6, 4, seed=5))
  for k, rescaled in ((1, False), (2, True)):
    ids, weights, _ = route(logits, k)
    probs = np.asarray(jax.nn.softmax(logits))
    raw = np.take_along_axis(probs, np.asarray(ids), axis=-1)
    want = raw / raw.sum(-1, keepdims=True) if rescaled else raw
    np.testing.assert_allclose(weights, want, rtol=1e-6)
  np.testing.assert_array_equal(route(logits, 1, renormalize=True)[1], 1.0)
  layer = ccf_nnx.MoE(8, 16, 4, k=1, axis_name=None, dispatch="reference", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (12, 8))
  grads = nnx.grad(lambda m: jnp.sum(m(x)[0] ** 2))(layer)
  assert np.abs(np.asarray(grads["router"]["kernel"][...])).max() > 1e-4


@pytest.mark.parametrize("renormalize", [True, False])
def test_gradients_reach_logits(renormalize):
  logits = _logits(5, 6, seed=3)

  def outputs(logits):
    _, weights, aux = route(jnp.asarray(logits), 2, renormalize=renormalize)
    return weights, aux.load_balancing_loss, aux.z_loss

  check_grads(outputs, (logits,), order=1, modes=("rev",), eps=1e-2)
  r = jnp.asarray(np.random.default_rng(4).standard_normal((5, 2)), jnp.float32)
  for term in (lambda w, lb, z: jnp.sum(w * r), lambda w, lb, z: lb, lambda w, lb, z: z):
    g = jax.grad(lambda l: term(*outputs(l)))(logits)
    assert np.abs(np.asarray(g)).max() > 1e-4


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_far_negative_logits_keep_weights_losses_and_gradients_finite(score):
  """A token whose logits are all far below 0 (a diverging run): its sigmoid scores underflow,
  and a renormalisation by their sum would give 0 / 0 (its gradient overflows first, near -44),
  which the losses' batch means and the router's gradient would spread to every token."""
  logits = _logits(4, 6, seed=9)
  for shift in (-30.0, -46.0, -80.0, -95.0, -200.0):
    shifted = logits.at[2].add(shift)

    def outputs(logits):
      _, weights, aux = route(logits, 2, score=score)
      return weights, aux.load_balancing_loss + aux.z_loss

    ids, weights, aux = route(shifted, 2, score=score)
    grad = jax.grad(lambda l: jnp.sum(outputs(l)[0] * jnp.arange(8.0).reshape(4, 2))
                    + outputs(l)[1])(shifted)
    assert np.isfinite(np.asarray(grad)).all(), (score, shift)
    assert np.isfinite(float(aux.load_balancing_loss)) and np.isfinite(float(aux.z_loss))
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    # The chosen experts' weights, as float64 scores of those experts renormalised.
    chosen = np.take_along_axis(np.asarray(shifted, np.float64), np.asarray(ids), axis=1)
    log_scores = (-np.logaddexp(0, -chosen) if score == "sigmoid"
                  else chosen - np.log(np.exp(np.asarray(shifted, np.float64)).sum(1,
                                                                                    keepdims=True)))
    want = np.exp(log_scores - log_scores.max(1, keepdims=True))
    np.testing.assert_allclose(weights, want / want.sum(1, keepdims=True), rtol=1e-5)
    if shift > -80:  # the scores still order the token's experts (they underflow past -87)
      np.testing.assert_array_equal(ids[2], np.argsort(-np.asarray(logits[2]), kind="stable")[:2])


def test_zero_tokens_give_zero_losses():
  """An empty batch (a device with no tokens) adds nothing to the loss, not NaN."""
  ids, weights, aux = route(jnp.zeros((0, 8)), 2)
  assert ids.shape == weights.shape == (0, 2)
  assert float(aux.load_balancing_loss) == 0.0 and float(aux.z_loss) == 0.0
  np.testing.assert_array_equal(aux.counts, np.zeros(8))
  grad = jax.grad(lambda l: route(l, 2)[2].load_balancing_loss + route(l, 2)[2].z_loss)(
      jnp.zeros((0, 8)))
  assert grad.shape == (0, 8)


def test_pmean_over_axis_equals_global():
  devices, tokens, experts, k = 4, 5, 8, 2
  logits = _logits(devices * tokens, experts, seed=5)
  # Skew the shards differently so per-device statistics differ from the global ones.
  logits = logits.at[:tokens, 0].add(4.0)

  def loss(logits, axis_name):
    _, _, aux = route(logits, k, axis_name=axis_name)
    return aux.load_balancing_loss + 0.1 * aux.z_loss

  sharded = jax.jit(jax.shard_map(
      lambda l: route(l, k, axis_name="ep"), mesh=ep_mesh(devices), in_specs=P("ep"),
      out_specs=(P("ep"), P("ep"), P())))
  ids, weights, aux = sharded(logits)
  want_ids, want_weights, want_aux = route(logits, k)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(weights, want_weights, rtol=1e-6)
  np.testing.assert_allclose(aux.load_balancing_loss, want_aux.load_balancing_loss, rtol=1e-5)
  np.testing.assert_allclose(aux.z_loss, want_aux.z_loss, rtol=1e-5)
  np.testing.assert_array_equal(aux.counts, want_aux.counts)
  local = route(logits[:tokens], k)[2]
  assert abs(float(local.load_balancing_loss - want_aux.load_balancing_loss)) > 1e-2

  grad_sharded = jax.jit(jax.grad(jax.shard_map(
      lambda l: loss(l, "ep"), mesh=ep_mesh(devices), in_specs=P("ep"), out_specs=P())))
  grad_global = jax.grad(lambda l: loss(l, None))
  np.testing.assert_allclose(grad_sharded(logits), grad_global(logits), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("logits,k,options,match", [
    (jnp.zeros((2, 3, 4)), 1, {}, "logits must have rank 2"),
    (jnp.zeros((3, 4), jnp.int32), 1, {}, "logits must be a float array"),
    (jnp.zeros((3, 4)), 0, {}, "k=0 must be between 1 and the number of experts 4"),
    (jnp.zeros((3, 4)), 5, {}, "k=5 must be between 1 and the number of experts 4"),
    (jnp.zeros((3, 4)), 1, {"score": "tanh"}, "unknown score 'tanh'"),
    (jnp.zeros((3, 6)), 1, {"num_groups": 4}, "num_groups=4 must be positive and divide"),
    (jnp.zeros((3, 8)), 1, {"num_groups": 4, "top_groups": 5},
     "top_groups=5 must be between 1 and num_groups=4"),
    (jnp.zeros((3, 8)), 5, {"num_groups": 4, "top_groups": 2},
     "k=5 is more than the 4 experts of top_groups=2 groups of 2"),
    (jnp.zeros((3, 8)), 1, {"scale": 0.0}, "scale=0.0 must be a positive finite number"),
    (jnp.zeros((3, 8)), 1, {"expert_bias": jnp.zeros(4)}, r"expert_bias must have shape \[E\]"),
    # 2.0 passed the range checks and hashed as 2, and a trace keyed on it broke later calls.
    (jnp.zeros((3, 4)), 2.0, {}, "k must be an int, got 2.0"),
    (jnp.zeros((3, 4)), True, {}, "k must be an int, got True"),
    (jnp.zeros((3, 8)), 1, {"num_groups": 2.0}, "num_groups must be an int, got 2.0"),
    (jnp.zeros((3, 8)), 1, {"num_groups": 4, "top_groups": 2.0},
     "top_groups must be an int, got 2.0"),
])
def test_bad_arguments(logits, k, options, match):
  with pytest.raises(ValueError, match=match):
    route(logits, k, **options)


def _numpy_route_with_options(logits, k, *, score, num_groups, top_groups, scale, bias,
                              renormalize):
  """Independent float64 routing with scores, groups (a group scores the sum of its two best
  biased scores), bias and scale; returns ids, weights, load balancing, counts."""
  logits = np.asarray(logits, np.float64)
  t, e = logits.shape
  if score == "softmax":
    scores = np.exp(logits - logits.max(axis=1, keepdims=True))
    scores /= scores.sum(axis=1, keepdims=True)
  else:
    scores = 1 / (1 + np.exp(-logits))
  choice = scores + np.asarray(bias, np.float64)
  size = e // num_groups
  grouped = choice.reshape(t, num_groups, size)
  group_scores = -np.sort(-grouped, axis=2)[:, :, :min(2, size)].sum(axis=2)
  kept = np.argsort(-group_scores, axis=1, kind="stable")[:, :top_groups]
  allowed = np.zeros((t, num_groups), bool)
  np.put_along_axis(allowed, kept, True, axis=1)
  choice = np.where(np.repeat(allowed, size, axis=1), choice, -np.inf)
  ids = np.argsort(-choice, axis=1, kind="stable")[:, :k]
  weights = np.take_along_axis(scores, ids, axis=1)
  if renormalize:
    weights /= weights.sum(axis=1, keepdims=True)
  counts = np.bincount(ids.ravel(), minlength=e)
  probs = scores / scores.sum(axis=1, keepdims=True)
  load_balancing = e * np.sum(counts / (t * k) * probs.mean(axis=0))
  return ids, scale * weights, load_balancing, counts


# (score, num_groups, top_groups, scale, renormalize, k) on 16 experts.
ROUTER_OPTIONS = [
    ("softmax", 1, 1, 1.0, True, 2),     # the bias alone
    ("sigmoid", 4, 2, 2.5, True, 3),     # DeepSeek-V3's router
    ("sigmoid", 16, 3, 1.0, False, 3),   # groups of one expert
    ("softmax", 8, 2, 0.5, False, 4),    # k fills both groups
]


@pytest.mark.parametrize("score,num_groups,top_groups,scale,renormalize,k", ROUTER_OPTIONS)
def test_router_options_match_numpy(score, num_groups, top_groups, scale, renormalize, k):
  tokens, experts = 24, 16
  logits = _logits(tokens, experts, seed=num_groups)
  # As large as the score differences, so the bias changes many choices.
  bias = jnp.asarray(np.random.default_rng(6).uniform(-0.3, 0.3, experts), jnp.float32)
  options = dict(score=score, num_groups=num_groups, top_groups=top_groups, scale=scale,
                 renormalize=renormalize)
  ids, weights, aux = jax.jit(lambda l, b: route(l, k, expert_bias=b, **options))(logits, bias)
  want_ids, want_weights, want_lb, want_counts = _numpy_route_with_options(
      logits, k, bias=bias, **options)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(weights, want_weights, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(aux.load_balancing_loss, want_lb, rtol=1e-5)
  np.testing.assert_array_equal(aux.counts, want_counts)
  # Each token stays inside its top groups, and the bias changed some choices.
  groups_used = [len(set(row)) for row in np.asarray(ids) // (experts // num_groups)]
  assert max(groups_used) <= top_groups
  unbiased = _numpy_route_with_options(logits, k, bias=np.zeros(experts), **options)[0]
  assert np.any(unbiased != want_ids)


@pytest.mark.parametrize("score,num_groups,top_groups,scale,renormalize,k", ROUTER_OPTIONS)
def test_scores_that_round_equal_choose_by_their_logits(score, num_groups, top_groups, scale,
                                                        renormalize, k):
  """Logits of a live router past about 17 (sigmoid) or 104 below a row's largest (softmax):
  their float32 scores tie at 1.0 (or 0), where the lowest ids would win the tie; the float64
  oracle tells them apart, and so must the choice."""
  tokens, experts = 24, 16
  rng = np.random.default_rng(num_groups)
  # Distinct logits in [18, 34] (float64 sigmoids differ there), or a row's largest then the
  # rest spread 110-130 below it (float64 softmax scores differ, float32's are 0).
  spread = np.stack([rng.permutation(np.linspace(18.0, 34.0, experts)) for _ in range(tokens)])
  if score == "softmax":
    spread = np.where(spread == spread.max(1, keepdims=True), 250.0, spread + 100.0)
  logits = jnp.asarray(spread, jnp.float32)
  options = dict(score=score, num_groups=num_groups, top_groups=top_groups, scale=scale,
                 renormalize=renormalize)
  ids, _, aux = jax.jit(lambda l: route(l, k, **options))(logits)
  want_ids, _, _, want_counts = _numpy_route_with_options(logits, k, bias=np.zeros(experts),
                                                          **options)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(aux.counts, want_counts)


def test_neutral_options_change_nothing():
  # A zero bias, all groups kept and scale 1 take other code paths to bitwise the same routing.
  logits = _logits(9, 8, seed=7)
  plain = jax.jit(lambda l: route(l, 2))(logits)
  neutral = jax.jit(lambda l: route(l, 2, num_groups=4, top_groups=4, scale=1.0,
                                    expert_bias=jnp.zeros(8)))(logits)
  jax.tree.map(np.testing.assert_array_equal, neutral, plain)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_logits_alone_choose_as_the_scores_do_through_ties_zeros_and_infinities(score):
  """With no bias and no groups, top_k of the logits picks; with a zero bias, the scores and
  their tie-break do. They agree where logits tie, where a zero router gives 0.0 and -0.0
  (equal, so the lower id wins), at +-inf and where float32 scores round equal."""
  values = np.array([0.0, -0.0, 1e-8, 1.0, 17.0, 18.0, 30.0, -30.0, 200.0, -200.0, np.inf,
                     -np.inf], np.float32)
  logits = np.random.default_rng(3).choice(values, (2000, 8))
  for k in (1, 2, 3, 8):
    plain = jax.jit(lambda l: route(l, k, score=score)[0])(logits)
    biased = jax.jit(lambda l: route(l, k, score=score, expert_bias=jnp.zeros(8))[0])(logits)
    np.testing.assert_array_equal(plain, biased)
  zero_router = np.where(np.arange(8) % 2, -0.0, 0.0).astype(np.float32)[None]
  np.testing.assert_array_equal(route(zero_router, 3, score=score)[0], [[0, 1, 2]])


def test_bias_gets_no_gradient_and_options_differentiate():
  logits = _logits(6, 8, seed=8)
  bias = jnp.asarray(np.random.default_rng(9).uniform(-0.2, 0.2, 8), jnp.float32)
  options = dict(score="sigmoid", num_groups=4, top_groups=2, scale=2.5)

  def outputs(logits, bias):
    _, weights, aux = route(logits, 3, expert_bias=bias, **options)
    return weights, aux.load_balancing_loss

  check_grads(jax.jit(lambda l: outputs(l, bias)), (logits,), order=1, modes=("rev",), eps=1e-2)
  total = lambda l, b: jnp.sum(jnp.sin(outputs(l, b)[0])) + outputs(l, b)[1]
  d_logits, d_bias = jax.jit(jax.grad(total, argnums=(0, 1)))(logits, bias)
  assert np.abs(np.asarray(d_logits)).max() > 1e-4
  np.testing.assert_array_equal(d_bias, np.zeros(8))


def test_a_traced_scale_routes_as_the_number_and_gets_its_gradient():
  logits = _logits(7, 8, seed=10)
  options = dict(score="sigmoid", num_groups=4, top_groups=2)
  fixed = jax.jit(lambda l: route(l, 3, scale=2.5, **options))(logits)
  traced = jax.jit(lambda l, s: route(l, 3, scale=s, **options))(logits, jnp.float32(2.5))
  jax.tree.map(np.testing.assert_array_equal, traced, fixed)
  # The weights are linear in the scale: d sum(weights) / d scale = sum(weights at scale 1).
  d_scale = jax.jit(jax.grad(lambda s: jnp.sum(route(logits, 3, scale=s, **options)[1])))(
      jnp.float32(2.5))
  np.testing.assert_allclose(d_scale, jnp.sum(route(logits, 3, **options)[1]), rtol=1e-6)
  with pytest.raises(ValueError, match=r"scale must be a scalar, got shape \(2,\)"):
    route(logits, 3, scale=jnp.ones(2))
  with pytest.raises(ValueError, match="scale=-1.0 must be a positive finite number"):
    route(logits, 3, scale=jnp.float32(-1.0))


def test_update_expert_bias_by_hand():
  # Mean load 3: expert 0 over it, expert 1 under it, experts 2 and 3 on it.
  bias = jnp.array([0.5, -0.5, 0.25, 0.0], jnp.float32)
  new = update_expert_bias(bias, jnp.array([5, 1, 3, 3], jnp.int32), rate=0.125)
  np.testing.assert_array_equal(new, [0.375, -0.375, 0.25, 0.0])
  with pytest.raises(ValueError, match=r"must have one shape, \[E\] or \[\.\.\., E\]"):
    update_expert_bias(bias, jnp.ones(3, jnp.int32), rate=0.1)
  with pytest.raises(ValueError, match=r"must have one shape"):
    update_expert_bias(jnp.float32(0), jnp.int32(1), rate=0.1)
  # Counts past float32's 2^24 still compare exactly with their mean (16777217 here).
  big = jnp.array([16777217, 16777216, 16777216, 16777219], jnp.int32)
  np.testing.assert_array_equal(update_expert_bias(jnp.zeros(4), big, rate=1.0), [0, 1, 1, -1])
  # Counts accumulated over steps: each fits its dtype, their total does not (2^31 and past).
  for counts in ([3_000_000_000, 1], [2**30, 2**30, 2**30, 5], [2**32 - 1, 2**32 - 2, 2**32 - 1],
                 [7, 9, 250, 2]):
    for dtype in (jnp.uint32, jnp.int32, jnp.uint8):
      if max(counts) > jnp.iinfo(dtype).max:
        continue
      mean = sum(counts) / len(counts)  # Python's exact integers, then one rounding
      want = [np.sign(sum(counts) - len(counts) * c) for c in counts]
      np.testing.assert_array_equal(
          update_expert_bias(jnp.zeros(len(counts)), jnp.array(counts, dtype), rate=1.0), want,
          err_msg=f"{counts} as {jnp.dtype(dtype).name} (mean {mean})")
  # Float counts (an average over steps, say) compare as floats, those at the mean exactly (a
  # rounded float32 mean once moved them: 21 / 7 is not 3 in float32).
  np.testing.assert_array_equal(
      update_expert_bias(jnp.zeros(4), jnp.array([5.0, 1.0, 3.0, 3.0]), rate=0.125),
      [-0.125, 0.125, 0.0, 0.0])
  np.testing.assert_array_equal(
      update_expert_bias(jnp.zeros(7), jnp.array([2.0, 4.0, 3.0, 3.0, 3.0, 3.0, 3.0]),
                         rate=0.125), [0.125, -0.125, 0, 0, 0, 0, 0])
  for rate in (float("nan"), -1e-3, jnp.ones(2)):
    with pytest.raises(ValueError, match="rate must be a finite number >= 0"):
      update_expert_bias(bias, jnp.ones(4, jnp.int32), rate=rate)
  # Stacked layers: each row against its own mean, as the layers one at a time.
  stacked_counts = jnp.array([[5, 1, 3, 3], [0, 0, 8, 0]], jnp.int32)
  stacked = update_expert_bias(jnp.stack([bias, -bias]), stacked_counts, rate=0.125)
  np.testing.assert_array_equal(stacked[0], new)
  np.testing.assert_array_equal(
      stacked[1], update_expert_bias(-bias, stacked_counts[1], rate=0.125))


def test_options_given_as_concrete_jax_scalars_are_checked_under_jit():
  """A `jnp.float32` made outside and closed over is known while tracing (jit would stage a
  comparison on it): checked as a Python number is, not a TracerBoolConversionError."""
  import jax_ccfuser as ccf
  logits = _logits(8, 4, seed=11)
  ids = jnp.stack([jnp.zeros(8, jnp.int32), jnp.arange(8, dtype=jnp.int32) % 4], 1)
  scale, rate, threshold = jnp.float32(2.5), jnp.float32(0.125), jnp.float32(1.1)
  bias, counts = jnp.zeros(4), jnp.array([5, 1, 3, 3], jnp.int32)
  for with_jax_scalar, with_python in [
      (lambda: route(logits, 2, scale=scale), lambda: route(logits, 2, scale=2.5)),
      (lambda: update_expert_bias(bias, counts, rate=rate),
       lambda: update_expert_bias(bias, counts, rate=0.125)),
      (lambda: ccf.reassign(ids, 4, threshold=threshold, tile=1),
       lambda: ccf.reassign(ids, 4, threshold=1.1, tile=1))]:
    jax.tree.map(np.testing.assert_array_equal, jax.jit(with_jax_scalar)(),
                 jax.jit(with_python)())
  bad_scale, bad_rate, bad_threshold = jnp.float32(-1.0), jnp.float32(jnp.nan), jnp.float32(0.5)
  for call, match in [
      (lambda: route(logits, 2, scale=bad_scale), "scale=-1.0 must be a positive"),
      (lambda: update_expert_bias(bias, counts, rate=bad_rate),
       "rate must be a finite number >= 0"),
      (lambda: ccf.reassign(ids, 4, threshold=bad_threshold), "threshold a number >= 1.0")]:
    with pytest.raises(ValueError, match=match):
      jax.jit(call)()
  # An int option traced (jit's positional arguments are) says how to keep it static.
  with pytest.raises(ValueError, match=r"k must be an int known while tracing, got the traced "
                                       r".*static_argnames='k'"):
    jax.jit(route)(logits, 2)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_bias_updates_even_out_a_skewed_router(score):
  # Experts 0 and 1 favoured by every token; no gradient, only the bias moves.
  tokens, experts, k, steps = 256, 8, 2, 40
  logits = _logits(tokens, experts, seed=10) / 3 + jnp.where(jnp.arange(experts) < 2, 1.5, 0.0)

  @jax.jit
  def run(logits):
    def step(bias, _):
      counts = route(logits, k, score=score, expert_bias=bias)[2].counts
      return update_expert_bias(bias, counts, rate=0.02), counts
    return jax.lax.scan(step, jnp.zeros(experts), None, length=steps)[1]

  imbalance = np.asarray(run(logits)).max(axis=1) / (tokens * k / experts)  # [steps]
  assert imbalance[0] > 2.5, imbalance
  assert imbalance[-5:].max() < 1.3, imbalance
