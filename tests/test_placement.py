"""Expert placement: routing counts against numpy, the ILP against greedy and known optima, and
a live model whose experts are moved computing and training exactly as before."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax.linen
import pytest
from flax import nnx

import jax_ccfuser as ccf
from jax_ccfuser import linen as ccf_linen
from jax_ccfuser import nnx as ccf_nnx
from jax_ccfuser import placement
from models.moe_lm import LMConfig, MoeLM
from models.train import TrainConfig, batch_placer, make_optimizer, train_step
from moe_cases import ep_mesh

DEVICES = 4
LM = LMConfig(seq_len=16, hidden=32, heads=2, layers=2, ffn=32, num_experts=8, axis_name="ep")
TRAIN = TrainConfig(batch=4, learning_rate=1e-2, warmup_steps=1, total_steps=10)
# Moving experts changes only the float32 summation order (router columns, kernel tiles).
RTOL, ATOL = 1e-5, 1e-6


def _numpy_stats(ids, source, num_devices, num_experts):
  """The counts of `routing_stats`, one (token, k) or (token, k, k') at a time."""
  rows = np.zeros((len(ids), num_devices, num_experts), np.int64)
  transitions = np.zeros((len(ids) - 1, num_experts, num_experts), np.int64)
  for layer, layer_ids in enumerate(ids):
    for token, experts in enumerate(layer_ids):
      for e in experts:
        rows[layer, source[token], e] += 1
      if layer + 1 < len(ids):
        for i in experts:
          for j in ids[layer + 1][token]:
            transitions[layer, i, j] += 1
  return rows, transitions


def test_stats_match_a_numpy_count():
  rng = np.random.default_rng(0)
  n, e, d = 48, 8, 4
  steps = [[rng.integers(0, e, (n, k)).astype(np.int32) for k in (2, 1, 3)] for _ in range(2)]
  source = rng.integers(0, d, n).astype(np.int32)
  update = jax.jit(lambda stats, ids, source: stats.update(ids, source=source))
  stats = placement.RoutingStats.zeros(3, d, e)
  for ids in steps:
    stats = update(stats, ids, source)
  want = [_numpy_stats(ids, source, d, e) for ids in steps]
  np.testing.assert_array_equal(stats.rows, want[0][0] + want[1][0])
  np.testing.assert_array_equal(stats.transitions, want[0][1] + want[1][1])
  assert stats.rows.dtype == jnp.int32 and stats.transitions.shape == (2, e, e)

  # Default source: the tokens split evenly in order, as the expert-parallel layer splits them.
  step = placement.routing_stats(steps[0], num_experts=e, num_devices=d)
  np.testing.assert_array_equal(step.rows, _numpy_stats(steps[0], np.arange(n) // (n // d), d, e)[0])


def test_stats_refuse_the_default_source_on_a_mesh_with_a_data_axis():
  """The layers split the tokens over every mesh axis: on a (data, ep) mesh token t is not on
  expert-axis device t // (N / D), and the default once counted half the rows as remote where
  none were."""
  ids = [jnp.zeros((8, 2), jnp.int32)]
  source = jnp.array([0, 0, 1, 1, 0, 0, 1, 1])  # the (data=2, ep=2) layer's split
  mesh = jax.make_mesh((2, 2), ("data", "ep"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[:4])
  with jax.set_mesh(mesh):
    with pytest.raises(ValueError, match=r"over the axes \['data', 'ep'\].*pass source="):
      placement.routing_stats(ids, num_experts=4, num_devices=2)
    stats = placement.RoutingStats.zeros(1, 2, 4).update(ids, source=source)
  np.testing.assert_array_equal(stats.rows[0, :, 0], [8, 8])
  with jax.set_mesh(ep_mesh(2)):  # the expert axis alone: the default is the layer's split
    np.testing.assert_array_equal(
        placement.routing_stats(ids, num_experts=4, num_devices=2).rows, stats.rows)


def test_stats_skip_out_of_range_ids():
  ids = [jnp.array([[0, -1], [3, 4]], jnp.int32)]
  stats = placement.routing_stats(ids, num_experts=4, num_devices=2)
  np.testing.assert_array_equal(stats.rows[0], [[1, 0, 0, 0], [0, 0, 0, 1]])
  assert stats.transitions.shape == (0, 4, 4)


def test_stats_count_ids_of_any_integer_type():
  """uint8 ids at E = 256 and int16 ids are counted as int32 ones (in their own type the bins
  wrapped, or overflowed)."""
  rng = np.random.default_rng(3)
  ids = [rng.integers(0, 256, (16, 2)) for _ in range(2)]
  want = placement.routing_stats([jnp.asarray(i, jnp.int32) for i in ids], num_experts=256,
                                 num_devices=2)
  for dtype in (jnp.uint8, jnp.int16, jnp.uint16):
    got = placement.routing_stats([jnp.asarray(i, dtype) for i in ids], num_experts=256,
                                  num_devices=2, source=jnp.arange(16, dtype=dtype) // 8)
    np.testing.assert_array_equal(got.rows, want.rows)
    np.testing.assert_array_equal(got.transitions, want.transitions)
  assert int(want.rows.sum()) == 2 * 16 * 2  # layers x tokens x K: every id counted


def _stats(rows, transitions=None):
  rows = np.asarray(rows, np.int32)
  if transitions is None:
    transitions = np.zeros((rows.shape[0] - 1, rows.shape[2], rows.shape[2]), np.int32)
  return placement.RoutingStats(jnp.asarray(rows), jnp.asarray(transitions, jnp.int32))


def test_locality_optimum_is_found():
  # Device 0 sends everything to experts 2 and 3, device 1 to experts 0 and 1: swapping the two
  # halves makes every row local, the identity makes every row remote.
  stats = _stats([[[0, 0, 50, 40], [30, 60, 0, 0]]])
  identity = placement.score(stats)
  assert identity.remote_fraction[0] == 1.0
  for method in placement.METHODS:
    solution = placement.solve(stats, 2, method=method)
    np.testing.assert_array_equal(solution.perms, [[2, 3, 0, 1]])
    assert solution.methods == (method,)
    assert placement.score(stats, solution.perms).remote_fraction[0] == 0.0


def test_balance_optimum_beats_greedy_and_identity():
  # Two hot experts that device 0 sends slightly more of: greedy (and the identity) put both on
  # device 0 (200 of 220 rows there: 1.82 x the mean); the optimum pairs each with a cold one.
  stats = _stats([[[60, 60, 5, 5], [40, 40, 5, 5]]])
  greedy = placement.score(stats, placement.solve(stats, 2, method="greedy").perms)
  ilp = placement.score(stats, placement.solve(stats, 2, method="ilp").perms)
  identity = placement.score(stats)
  np.testing.assert_allclose([greedy.max_load[0], identity.max_load[0]], 200 / 110)
  assert ilp.max_load[0] == 1.0
  assert ilp.remote_fraction[0] == 0.5  # the rows it gives up: 110 of 220


def test_greedy_breaks_ties_toward_the_least_loaded_device():
  """Expert 0 (the hottest) goes to device 0; experts 1 and 2 tie in rows from each device,
  so expert 1 goes to the emptier device 1 and expert 2 back to device 0."""
  stats = _stats([[[10, 5, 3, 3], [0, 5, 3, 3]]])
  np.testing.assert_array_equal(placement.solve(stats, 2, method="greedy").perms, [[0, 2, 1, 3]])


@pytest.mark.parametrize("method", ["ilp", "greedy"])
def test_where_every_placement_ties_nothing_moves(method):
  """Uniform routing, and a layer no token reached: any placement is optimal, and moving experts
  moves their weights and optimizer state for nothing."""
  e, d = 8, 4
  rows = np.stack([np.full((d, e), 10), np.zeros((d, e), np.int64)])
  solution = placement.solve(_stats(rows), d, method=method)
  np.testing.assert_array_equal(solution.perms, np.tile(np.arange(e), (2, 1)))
  # HiGHS proved the identity optimal; greedy's own placement was another under uniform routing
  # (a round robin, its ties to the least loaded device), and the identity with no rows.
  assert solution.methods == (("ilp", "ilp") if method == "ilp" else ("identity", "greedy"))
  # Greedy judges by remote rows first: it keeps its placement (2 of 22 rows remote) over the
  # better balanced identity (11 of 22).
  stats = _stats([[[10, 1, 10, 1], [0, 0, 0, 0]]])
  if method == "greedy":
    assert placement.score(stats, placement.solve(stats, 2, method=method).perms
                           ).remote_fraction[0] == pytest.approx(2 / 22)


def test_cross_layer_term_colocates_consecutive_experts():
  # No locality and equal loads, so only the transitions matter: expert i of layer 0 always
  # hands its tokens to expert (i + 3) % 8 of layer 1, which the identity puts elsewhere.
  e, d = 8, 4
  rows = np.full((2, d, e), 10)
  transitions = np.zeros((1, e, e), np.int32)
  transitions[0, np.arange(e), (np.arange(e) + 3) % e] = 25
  stats = _stats(rows, transitions)
  assert placement.score(stats).cross_fraction[0] == 1.0
  solution = placement.solve(stats, d, transition_weight=1.0)
  assert placement.score(stats, solution.perms).cross_fraction[0] == 0.0
  assert placement.score(stats, placement.solve(stats, d, transition_weight=0.0).perms
                         ).cross_fraction[0] > 0


def _synthetic(seed, *, layers=3, devices=4, experts=16, tokens=2048, k=2):
  """Routing with a Zipf-like expert popularity and a per-device preference, like skewed data."""
  rng = np.random.default_rng(seed)
  popularity = rng.zipf(1.6, experts).clip(max=40).astype(float)
  preference = rng.dirichlet(np.ones(experts), size=devices) * popularity
  preference /= preference.sum(axis=1, keepdims=True)
  source = np.arange(tokens) // (tokens // devices)
  ids = [np.stack([(rng.random((tokens, 1)) > np.cumsum(preference[source], axis=1)).sum(axis=1)
                   for _ in range(k)], axis=1).astype(np.int32) for _ in range(layers)]
  return placement.routing_stats(ids, num_experts=experts, num_devices=devices)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ilp_beats_or_equals_greedy(seed):
  stats = _synthetic(seed)
  greedy = placement.score(stats, placement.solve(stats, 4, method="greedy").perms)

  def ilp(**weights):
    solution = placement.solve(stats, 4, gap=1e-6, **weights)
    assert set(solution.methods) == {"ilp"}
    return placement.score(stats, solution.perms)

  # The objective it minimises (per layer, in units of the layer's rows): never above greedy's.
  both = ilp(balance_weight=1.0, transition_weight=0.0)
  np.testing.assert_array_less(both.remote_fraction + both.max_load,
                               greedy.remote_fraction + greedy.max_load + 1e-9)
  # Each criterion alone: remote rows (no balance term), busiest device (balance dominating).
  np.testing.assert_array_less(ilp(balance_weight=0.0, transition_weight=0.0).remote_fraction,
                               greedy.remote_fraction + 1e-9)
  np.testing.assert_array_less(ilp(balance_weight=1e3, transition_weight=0.0).max_load,
                               greedy.max_load + 1e-9)


def test_time_out_falls_back_to_greedy():
  stats = _synthetic(0, devices=8, experts=64)
  solution = placement.solve(stats, 8, time_limit=1e-9)
  assert solution.methods == ("greedy",) * 3
  np.testing.assert_array_equal(solution.perms, placement.solve(stats, 8, method="greedy").perms)


def test_bad_arguments():
  stats = _stats([[[1, 2, 3, 4], [4, 3, 2, 1]]])
  with pytest.raises(ValueError, match="unknown method"):
    placement.solve(stats, 2, method="anneal")
  with pytest.raises(ValueError, match="recorded over 2 devices"):
    placement.solve(stats, 4)
  with pytest.raises(ValueError, match="not a permutation"):
    placement.score(stats, [[0, 0, 1, 2]])
  with pytest.raises(ValueError, match="3 layers"):
    placement.RoutingStats.zeros(3, 2, 4).update([jnp.zeros((4, 2), jnp.int32)])
  for option in ({"balance_weight": float("nan")}, {"time_limit": float("nan")},
                 {"sweeps": 1.5}, {"gap": -1.0}, {"balance_weight": float("inf")},
                 {"transition_weight": float("inf")}):
    with pytest.raises(ValueError, match="need time_limit > 0, a non-negative gap, finite"):
      placement.solve(stats, 2, **option)
  # Counts that are no counts: the ILP failed inside SciPy, greedy moved experts on NaN.
  for bad in (float("nan"), float("inf"), 2.5):
    for fn in (placement.score, lambda s: placement.solve(s, 2, method="greedy"),
               lambda s: placement.solve(s, 2)):
      with pytest.raises(ValueError, match="stats must hold whole counts"):
        fn(placement.RoutingStats(jnp.asarray([[[1, 2, 3, bad], [4, 3, 2, 1]]]),
                                  jnp.zeros((0, 4, 4))))
  with pytest.raises(ValueError,
                     match="num_experts=6 is not divisible by the expert-parallel axis size 4"):
    placement.score(placement.RoutingStats.zeros(1, 4, 6))
  # Totals that wrapped past 2**31 - 1, and transitions of another layer count or expert count.
  wrapped = _stats([[[1, 2, 3, 4], [4, 3, 2, 1]], [[1, 2, 3, -2**31 + 5], [4, 3, 2, 1]]])
  for fn in (placement.score, lambda s: placement.solve(s, 2)):
    with pytest.raises(ValueError, match=r"stats hold negative counts: an int32 total that passed "
                                         r"2\*\*31 - 1 wraps around"):
      fn(wrapped)
    for transitions in (np.zeros((2, 4, 4)), np.zeros((0, 4, 8))):
      with pytest.raises(ValueError, match=r"stats.transitions must be \[L - 1, E, E\] = "
                                           r"\[0, 4, 4\] for rows \[1, 2, 4\]"):
        fn(_stats([[[1, 2, 3, 4], [4, 3, 2, 1]]], transitions))


def test_a_layer_without_rows_scores_as_nothing_remote():
  score = placement.score(placement.RoutingStats.zeros(2, 2, 4))
  np.testing.assert_array_equal(score.remote_fraction, [0.0, 0.0])
  np.testing.assert_array_equal(score.max_load, [1.0, 1.0])
  np.testing.assert_array_equal(score.cross_fraction, [0.0])


def test_ilp_is_never_worse_than_the_identity():
  """With a strong cross-layer term the first pass places layer 0 blind to layer 1, and the
  descent once settled at 271.3 where leaving both layers in place costs 242.5."""
  ids = [[[0, 1], [0, 1], [0, 2], [0, 4], [2, 1], [0, 1], [3, 0], [3, 4], [0, 5], [1, 0], [0, 4],
          [4, 3]],
         [[1, 0], [1, 4], [1, 3], [2, 5], [3, 0], [0, 3], [2, 1], [2, 5], [1, 4], [0, 1], [1, 5],
          [5, 2]]]
  stats = placement.routing_stats([jnp.asarray(i, jnp.int32) for i in ids], num_experts=6,
                                  num_devices=3)
  solution = placement.solve(stats, 3, balance_weight=0.1, transition_weight=10.0)
  np.testing.assert_array_equal(solution.perms, [np.arange(6)] * 2)
  assert solution.methods == ("identity", "identity")


# Counts, places and permutes with `placement`'s Flax-free names; `result` holds what they give.
_FLAX_FREE_STEPS = """
ids = [np.array([[0, 1], [2, 3], [0, 2], [1, 3]], np.int32),
       np.array([[1, 2], [3, 0], [2, 1], [0, 3]], np.int32)]
stats = placement.RoutingStats.zeros(2, 2, 4).update(ids)
solution = placement.solve(stats, 2, method="greedy")
tree = {"moe": {"w_in": np.arange(4.0).reshape(4, 1, 1), "router": {"kernel": np.eye(4)}}}
moved = placement.permute(tree, solution.perms[:1], layers=[("moe",)])
result = [stats.rows.tolist(), solution.perms.tolist(),
          placement.score(stats, solution.perms).remote_fraction.tolist(),
          jax.tree.map(lambda a: np.asarray(a).tolist(), moved)]
"""


def test_flax_free_part_imports_and_runs_without_flax_and_scipy():
  """As installed without the `flax` extra: a None in `sys.modules` makes `import flax` (and
  `import scipy`, which only the ILP needs) raise ImportError. Only the NNX names then fail."""
  child = ("import sys\n"
           "sys.modules['flax'] = sys.modules['scipy'] = None\n"
           "import json, jax, numpy as np\n"
           "from jax_ccfuser import placement\n"
           + _FLAX_FREE_STEPS +
           "print(json.dumps(result))\n"
           "try:\n  placement.apply\nexcept ImportError:\n  print('no flax')\n")
  run = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0, run.stderr
  here = {"np": np, "jax": jax, "placement": placement}
  exec(_FLAX_FREE_STEPS, here)
  assert run.stdout.splitlines() == [json.dumps(here["result"]), "no flax"]


def _tokens(seed, batch=TRAIN.batch):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (batch, LM.seq_len + 1)).astype(np.int32)


@pytest.fixture(scope="module")
def trained():
  """A model and optimizer after one step (so Adam's moments are not zero), on a 4-device mesh."""
  mesh = ep_mesh(DEVICES)
  with jax.set_mesh(mesh):
    model = MoeLM(LM, rngs=nnx.Rngs(0))
    optimizer = make_optimizer(model, TRAIN)
    train_step(model, optimizer, batch_placer(mesh, "ep")(_tokens(0)), config=TRAIN)
  return mesh, model, optimizer


def _perms():
  rng = np.random.default_rng(7)
  return np.stack([rng.permutation(LM.num_experts) for _ in range(LM.layers)])


def test_capture_expert_ids_matches_the_router(trained):
  mesh, model, _ = trained
  with jax.set_mesh(mesh):
    forward = nnx.jit(placement.capture_expert_ids(lambda m, t: m(t)))
    (_, auxes), ids = forward(model, batch_placer(mesh, "ep")(_tokens(1)[:, :-1]))
  assert placement.moe_layers(model) == (("blocks", 0, "ffn"), ("blocks", 1, "ffn"))
  stats = placement.routing_stats(ids, num_experts=LM.num_experts, num_devices=DEVICES)
  for layer, aux in enumerate(auxes):
    assert ids[layer].shape == (TRAIN.batch * LM.seq_len, LM.k)
    np.testing.assert_array_equal(stats.rows[layer].sum(axis=0), aux.counts)


def test_apply_keeps_outputs_and_training(trained):
  mesh, model, optimizer = trained
  perms = _perms()
  place = batch_placer(mesh, "ep")
  with jax.set_mesh(mesh):
    moved, moved_optimizer = nnx.clone(model), nnx.clone(optimizer)
    placement.apply(moved, moved_optimizer, perms)
    forward = nnx.jit(lambda m, t: m(t))
    tokens = place(_tokens(2)[:, :-1])
    (logits, auxes), (moved_logits, moved_auxes) = forward(model, tokens), forward(moved, tokens)
    np.testing.assert_allclose(moved_logits, logits, rtol=RTOL, atol=ATOL)
    for layer, (aux, moved_aux) in enumerate(zip(auxes, moved_auxes)):
      np.testing.assert_array_equal(moved_aux.counts, np.asarray(aux.counts)[perms[layer]])

    w_in = moved.blocks[1].ffn.w_in[...]
    np.testing.assert_array_equal(w_in, np.asarray(model.blocks[1].ffn.w_in[...])[perms[1]])
    assert w_in.sharding == model.blocks[1].ffn.w_in[...].sharding

    # A step after moving equals the moved image of the step taken without moving.
    step = place(_tokens(3))
    metrics = train_step(model, optimizer, step, config=TRAIN)
    moved_metrics = train_step(moved, moved_optimizer, step, config=TRAIN)
  np.testing.assert_allclose(moved_metrics["loss"], metrics["loss"], rtol=RTOL)
  layers = placement.moe_layers(model)
  for before, after in ((model, moved), (optimizer, moved_optimizer)):
    want = placement.permute(nnx.to_pure_dict(nnx.state(before)), perms, layers=layers)
    jax.tree.map(lambda w, g: np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL),
                 want, nnx.to_pure_dict(nnx.state(after)))


def test_apply_rejects_a_model_without_those_layers(trained):
  _, model, optimizer = trained
  with pytest.raises(ValueError, match="no parameter"):
    placement.apply(nnx.clone(model), None, _perms()[:1], layers=[("blocks", 0, "attention")])


def test_apply_moves_the_expert_bias_and_refuses_expert_groups():
  # The bias decides the routing here, so the outputs only match if it moves with its experts.
  layer = ccf_nnx.MoE(16, 8, 8, k=2, score="sigmoid", expert_bias=True, dispatch="reference",
                      axis_name=None, rngs=nnx.Rngs(0))
  layer.expert_bias[...] = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, 8), jnp.float32)
  x = jax.random.normal(jax.random.key(3), (12, 16))
  forward = nnx.jit(placement.capture_expert_ids(lambda m, x: m(x)))
  (y, aux), (ids,) = forward(layer, x)
  np.testing.assert_array_equal(np.bincount(np.ravel(ids), minlength=8), aux.counts)
  perm = _perms()[:1]
  bias = np.asarray(layer.expert_bias[...])
  placement.apply(layer, None, perm)
  (moved_y, moved_aux), _ = forward(layer, x)
  np.testing.assert_array_equal(layer.expert_bias[...], bias[perm[0]])
  np.testing.assert_allclose(moved_y, y, rtol=RTOL, atol=ATOL)
  np.testing.assert_array_equal(moved_aux.counts, np.asarray(aux.counts)[perm[0]])
  grouped = ccf_nnx.MoE(16, 8, 8, k=2, num_groups=4, top_groups=2, axis_name=None,
                        rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="group-limited routing"):
    placement.apply(grouped, None, perm)


def _small_layer(**options):
  return ccf_nnx.MoE(16, 32, 4, k=2, axis_name=None, dispatch="reference", rngs=nnx.Rngs(0),
                     **options)


def _adam_step(optimizer, model, x):
  grads = nnx.grad(lambda m: jnp.mean(m(x)[0] ** 2))(model)
  if isinstance(optimizer, nnx.ModelAndOptimizer):  # it knows its model
    optimizer.update(grads)
  else:
    optimizer.update(model, grads)


_jitted_adam_step = nnx.jit(_adam_step)


def _adam_steps(optimizer, model, seeds, *, jit=False):
  """Adam steps on random tokens; jitted where several steps or a mesh make compiling pay (a
  single eager step on one device runs faster than it compiles)."""
  for seed in seeds:
    (_jitted_adam_step if jit else _adam_step)(
        optimizer, model, jax.random.normal(jax.random.key(seed), (24, 16)))


def test_apply_moves_a_model_held_by_its_optimizer_once():
  """nnx.ModelAndOptimizer holds the model: its variables are the model's, moved once (they
  were moved again as the optimizer's), and Adam's moments with them, so training goes on as the
  moved image of the run that did not move."""
  perm = np.array([[1, 2, 3, 0]])
  runs = []
  for moved in (False, True):
    model = _small_layer()
    optimizer = nnx.ModelAndOptimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    _adam_steps(optimizer, model, (10, 11, 12), jit=True)
    w_in = np.asarray(model.w_in[...])
    if moved:
      placement.apply(model, optimizer, perm)
      np.testing.assert_array_equal(model.w_in[...], w_in[perm[0]])
    _adam_steps(optimizer, model, (13, 14, 15), jit=True)
    runs.append(model)
  np.testing.assert_allclose(runs[1].w_in[...], np.asarray(runs[0].w_in[...])[perm[0]],
                             rtol=RTOL, atol=ATOL)


def test_apply_and_permute_keep_explicit_shardings():
  """On an Explicit mesh (`jax.make_mesh`'s default) a gather along a sharded axis must name
  its result's sharding (else ShardingTypeError): `apply` and `permute` do."""
  perm = np.array([[5, 2, 7, 0, 1, 6, 3, 4]])
  mesh = jax.make_mesh((DEVICES,), ("ep",), axis_types=(jax.sharding.AxisType.Explicit,),
                       devices=jax.devices()[:DEVICES])
  x = jax.random.normal(jax.random.key(3), (24, 16))
  with jax.set_mesh(mesh):
    model = ccf_nnx.MoE(16, 32, 8, k=2, axis_name="ep", rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    _adam_steps(optimizer, model, (20,), jit=True)
    forward = nnx.jit(lambda m, x: m(x)[0])
    y = forward(model, x)
    before = nnx.to_pure_dict(nnx.state((model, optimizer)))
    placement.apply(model, optimizer, perm)
    np.testing.assert_allclose(forward(model, x), y, rtol=RTOL, atol=ATOL)
    after = nnx.to_pure_dict(nnx.state((model, optimizer)))
  assert model.w_in[...].sharding.spec == jax.sharding.PartitionSpec("ep", None, None)
  moved = lambda leaf, path: np.asarray(leaf)[perm[0]] if path[-1] in ("w_in", "w_out") else (
      np.asarray(leaf)[..., perm[0]] if path[-2:] == ("router", "kernel") else np.asarray(leaf))
  for path, leaf in jax.tree_util.tree_flatten_with_path(before)[0]:
    keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
    got = after
    for k in keys:
      got = got[k]
    np.testing.assert_array_equal(got, moved(leaf, keys))
  # Linen parameters made under the mesh (the router kernel sharded along its expert axis too).
  linen = ccf_linen.MoE(num_experts=8, ffn=32, k=2, axis_name="ep", dispatch="reference")
  with jax.set_mesh(mesh):
    params = flax.linen.unbox(jax.jit(linen.init)(jax.random.key(1), x))
    kernel = params["params"]["router"]["kernel"]
    params["params"]["router"]["kernel"] = jax.sharding.reshard(
        kernel, jax.sharding.PartitionSpec(None, "ep"))
    permuted = placement.permute(params, perm, layers=[("params",)])
  kernel = params["params"]["router"]["kernel"]
  np.testing.assert_array_equal(permuted["params"]["router"]["kernel"],
                                np.asarray(kernel)[:, perm[0]])
  assert permuted["params"]["router"]["kernel"].sharding == kernel.sharding
  np.testing.assert_array_equal(permuted["params"]["w_in"],
                                np.asarray(params["params"]["w_in"])[perm[0]])


def test_apply_refuses_a_factored_optimizer_state_and_moves_nothing():
  """Adafactor's factored and placeholder moments have no expert axis to move: a clear error,
  and the model stays as it was (it once moved before the optimizer was refused)."""
  model = _small_layer()
  optimizer = nnx.Optimizer(model, optax.adafactor(1e-2), wrt=nnx.Param)
  _adam_steps(optimizer, model, (10,))
  w_in = np.asarray(model.w_in[...])
  with pytest.raises(ValueError, match=r"the optimizer's state cannot move with its parameters: "
                                       r".* not factored ones \(Adafactor's\); nothing was moved"):
    placement.apply(model, optimizer, [[1, 2, 3, 0]])
  np.testing.assert_array_equal(model.w_in[...], w_in)


def test_apply_refuses_state_in_pieces_and_moves_nothing():
  """SM3 keeps one accumulator per axis of a parameter (a list under its name): none has the
  parameter's shape, so none can move with it, and leaving them was a silent error."""
  model = _small_layer()
  optimizer = nnx.Optimizer(model, optax.sm3(1e-2), wrt=nnx.Param)
  _adam_steps(optimizer, model, (10,))
  w_in = np.asarray(model.w_in[...])
  with pytest.raises(ValueError, match=r"the optimizer's state cannot move with its parameters: "
                                       r".*\.value\[0\] is a piece of .*'s state, not an array "
                                       r"of its shape.*nothing was moved"):
    placement.apply(model, optimizer, [[1, 2, 3, 0]])
  np.testing.assert_array_equal(model.w_in[...], w_in)


class _Nested(nnx.Module):
  """An MoE layer "moe" beside a block holding another, "block/moe": one path ends the other."""

  def __init__(self):
    self.block = nnx.Dict(moe=_small_layer())
    self.moe = ccf_nnx.MoE(16, 32, 4, k=2, axis_name=None, dispatch="reference",
                           rngs=nnx.Rngs(1))

  def __call__(self, x):
    return self.moe(self.block["moe"](x)[0])[0]


def test_apply_moves_each_layer_of_paths_that_end_alike_once():
  model = _Nested()
  assert placement.moe_layers(model) == (("block", "moe"), ("moe",))
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  _adam_steps(optimizer, model, (11,))
  x = jax.random.normal(jax.random.key(2), (24, 16))
  before = model(x)
  placement.apply(model, optimizer, [[1, 2, 3, 0], [3, 2, 1, 0]])
  np.testing.assert_allclose(model(x), before, rtol=RTOL, atol=ATOL)
  # Only "moe": "block/moe", whose path ends in it, stays (it once moved too).
  block_w_in = np.asarray(model.block["moe"].w_in[...])
  placement.apply(model, optimizer, [[1, 0, 3, 2]], layers=[("moe",)])
  np.testing.assert_array_equal(model.block["moe"].w_in[...], block_w_in)
  np.testing.assert_allclose(model(x), before, rtol=RTOL, atol=ATOL)


def test_layers_stacked_for_scan_are_refused():
  """nnx.vmap builds L layers as one module of [L, E, ...] weights: apply took the layer axis
  for the expert axis, and capture_expert_ids merged the layers' tokens."""
  stacked = nnx.vmap(lambda key: ccf_nnx.MoE(16, 32, 4, axis_name=None, dispatch="reference",
                                             rngs=nnx.Rngs(key)))(jax.random.split(
                                                 jax.random.key(0), 4))
  message = r"the MoE layer at \(\) holds layers stacked on a leading axis \(w_in \[4, 4, 16, 64\]"
  with pytest.raises(ValueError, match=message):
    placement.apply(stacked, None, [[1, 0, 3, 2]] * 4)
  with pytest.raises(ValueError, match=message):
    placement.capture_expert_ids(lambda m, x: x)(stacked, jnp.ones((8, 16)))
  # permute, on its own, refuses a variable of another rank than one layer's.
  with pytest.raises(ValueError, match=r"has shape \[4, 16, 4\]; one layer's has rank 2"):
    placement.permute(nnx.state(stacked), [[1, 0, 3, 2]], layers=[()])


def test_captured_ids_are_those_routed_when_the_step_then_moves_the_bias():
  """A training step that updates the expert bias after its forward pass: the captured ids are
  the ones the layer routed with the bias it had, not with the updated one."""
  layer = _small_layer(score="sigmoid", expert_bias=True)
  x = jax.random.normal(jax.random.key(3), (64, 16))

  def step(model, x):
    y, aux = model(x)
    model.expert_bias[...] = ccf.update_expert_bias(model.expert_bias[...], aux.counts, rate=0.5)
    return aux.counts

  counts, (ids,) = nnx.jit(placement.capture_expert_ids(step))(layer, x)
  np.testing.assert_array_equal(np.bincount(np.ravel(ids), minlength=4), counts)
  assert np.abs(np.asarray(layer.expert_bias[...])).max() == 0.5  # the step moved it


def test_permute_plain_linen_and_optax_pytrees():
  moe = ccf_linen.MoE(num_experts=8, ffn=16, k=2, axis_name=None, dispatch="reference")
  x = jax.random.normal(jax.random.key(0), (24, 16))
  # Random parameters of the layer's shapes (compiling `moe.init` alone takes seconds).
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype),
                        jax.eval_shape(moe.init, jax.random.key(1), x))
  tx = optax.adam(1e-2)
  perms = _perms()[:1]

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(lambda p: jnp.sum(moe.apply(p, x)[0] ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = step(params, tx.init(params))
  moved = placement.permute((params, opt_state), perms, layers=[("params",)])
  # A bare string is a path of one key (it once matched nothing: the path of its letters).
  jax.tree.map(np.testing.assert_array_equal, moved,
               placement.permute((params, opt_state), perms, layers=["params"]))
  forward = jax.jit(lambda p: moe.apply(p, x)[0])
  np.testing.assert_allclose(forward(moved[0]), forward(params), rtol=RTOL, atol=ATOL)
  want = placement.permute(step(params, opt_state), perms, layers=[("params",)])
  jax.tree.map(lambda w, g: np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL),
               want, step(*moved))
  # A router with a bias (a Dense of the user's own): its per-expert outputs move too.
  biased = {"moe": {"router": {"kernel": jnp.zeros((16, 8)), "bias": jnp.arange(8.0)}}}
  moved = placement.permute(biased, perms, layers=["moe"])
  np.testing.assert_array_equal(moved["moe"]["router"]["bias"], perms[0])
