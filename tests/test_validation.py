"""Every argument fault of the MoE entry points is a ValueError that says what is wrong."""

import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_ccfuser as ccf
from jax_ccfuser import all_to_all_moe, fused_moe, reassign, reference_moe
from jax_ccfuser._validation import (GPU_MAX_EXPERTS_HERE, GPU_MAX_PEERS, GPU_MAX_TOP_K, axis_size,
                                     check_gpu_group, check_num_experts)
from moe_cases import Case, emulated_plan, ep_mesh, make_inputs, shard_ep, sharded

MOE_FNS = [reference_moe, all_to_all_moe, fused_moe]

# T=3, H=4, F=5, E_local=2, K=2, swiglu: w_in [2, 4, 10], w_out [2, 5, 4].
_CASE = Case(devices=1, tokens=3, hidden=4, ffn=5, experts_local=2, k=2)


def _replace(**changes):
  names = ("x", "expert_ids", "expert_weights", "w_in", "w_out")
  args = dict(zip(names, make_inputs(_CASE)))
  args.update(changes)
  return args


_rng = np.random.default_rng(0)


def _array(shape, dtype=jnp.float32):
  return jnp.asarray(_rng.standard_normal(shape), dtype)


# (id, changed arguments, options, expected message regex)
FAULTS = [
    ("activation", {}, {"activation": "tanh"}, r"unknown activation 'tanh'; expected one of"),
    ("x_rank", {"x": _array((1, 3, 4))}, {}, r"x must have rank 2, got shape \(1, 3, 4\)"),
    ("ids_rank", {"expert_ids": jnp.zeros(3, jnp.int32)}, {},
     r"expert_ids must have rank 2, got shape \(3,\)"),
    ("weights_rank", {"expert_weights": _array((3, 2, 1))}, {},
     r"expert_weights must have rank 2"),
    ("w_in_rank", {"w_in": _array((4, 10))}, {}, r"w_in must have rank 3, got shape \(4, 10\)"),
    ("w_out_rank", {"w_out": _array((5, 4))}, {}, r"w_out must have rank 3"),
    ("x_dtype", {"x": jnp.ones((3, 4), jnp.int32)}, {},
     r"x must be float32, bfloat16 or float16, got int32"),
    ("ids_dtype", {"expert_ids": jnp.zeros((3, 2), jnp.float32)}, {},
     r"expert_ids must be int32, got float32"),
    ("ids_int16", {"expert_ids": jnp.zeros((3, 2), jnp.int16)}, {},
     r"expert_ids must be int32, got int16"),
    ("weights_dtype", {"expert_weights": _array((3, 2), jnp.float16)}, {},
     r"expert_weights must be float32 or x's dtype \(float32\), got float16"),
    ("w_in_dtype", {"w_in": jnp.ones((2, 4, 10), jnp.int32)}, {},
     r"w_in must have x's dtype \(float32\), got int32"),
    ("w_out_dtype", {"w_out": jnp.ones((2, 5, 4), jnp.int8)}, {},
     r"w_out must have x's dtype \(float32\), got int8"),
    # The handlers take one dtype for x and the weights; the contract says so for all three.
    ("w_in_other_float", {"w_in": _array((2, 4, 10), jnp.bfloat16)}, {},
     r"w_in must have x's dtype \(float32\), got bfloat16: cast one side first"),
    ("w_out_other_float", {"w_out": _array((2, 5, 4), jnp.float16)}, {},
     r"w_out must have x's dtype \(float32\), got float16"),
    ("ids_rows", {"expert_ids": jnp.zeros((4, 2), jnp.int32)}, {},
     r"expert_ids has 4 rows but x has 3 tokens"),
    ("weights_shape", {"expert_weights": _array((3, 1))}, {},
     r"expert_weights shape \(3, 1\) != expert_ids shape \(3, 2\)"),
    ("k_zero", {"expert_ids": jnp.zeros((3, 0), jnp.int32), "expert_weights": _array((3, 0))}, {},
     r"at least one expert \(K >= 1\)"),
    ("w_out_hidden", {"w_out": _array((2, 5, 6))}, {}, r"w_out must be \[E_local, F, H=4\]"),
    ("w_in_not_gated_width", {"w_in": _array((2, 4, 5))}, {},
     r"w_in must be \[2, 4, 10\] for activation 'swiglu' \(gated: \[E_local, H, 2F\]\), "
     r"got \[2, 4, 5\]"),
    ("w_in_gated_width", {}, {"activation": "gelu"},
     r"w_in must be \[2, 4, 5\] for activation 'gelu' \(\[E_local, H, F\]\), got \[2, 4, 10\]"),
    ("w_in_experts", {"w_in": _array((3, 4, 10))}, {}, r"w_in must be \[2, 4, 10\]"),
    ("w_in_hidden", {"w_in": _array((2, 6, 10))}, {}, r"w_in must be \[2, 4, 10\]"),
    ("no_experts", {"w_in": _array((0, 4, 10)), "w_out": _array((0, 5, 4))}, {},
     r"no experts or an empty FFN"),
    ("empty_ffn", {"w_in": _array((2, 4, 0)), "w_out": _array((2, 0, 4))}, {},
     r"no experts or an empty FFN"),
    # H = 0 reached the handlers, which divided by it (SIGFPE).
    ("no_features", {"x": _array((3, 0)), "w_in": _array((2, 0, 10)), "w_out": _array((2, 5, 0))},
     {}, r"x \(3, 0\) has no features \(H = 0\)"),
    ("ids_list", {"expert_ids": [[0, 1]] * 3}, {},
     r"expert_ids must be an array \(jax or numpy\), got list"),
    ("x_list", {"x": [[0.0] * 4] * 3}, {}, r"x must be an array \(jax or numpy\), got list"),
    # A list was looked up in the activations' table: TypeError: unhashable type.
    ("activation_list", {}, {"activation": ["swiglu"]}, r"unknown activation \['swiglu'\]"),
    ("unbound_axis", {}, {"axis_name": "ep"},
     r"axis_name='ep' is not bound here: call this inside jax.shard_map"),
]


@pytest.mark.parametrize("moe_fn", MOE_FNS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("changes,options,match", [f[1:] for f in FAULTS],
                         ids=[f[0] for f in FAULTS])
def test_bad_arguments(moe_fn, changes, options, match):
  with pytest.raises(ValueError, match=match):
    moe_fn(**_replace(**changes), **options)


@pytest.mark.parametrize("changes,options,match",
                         [f[1:] for f in FAULTS if "axis_name" not in f[2]],
                         ids=[f[0] for f in FAULTS if "axis_name" not in f[2]])
def test_bad_arguments_emulated(changes, options, match):
  """The emulated entry checks as the others do (a list x met its even-split check first:
  AttributeError)."""
  from jax_ccfuser.experimental import fused_moe_emulated
  with pytest.raises(ValueError, match=match):
    fused_moe_emulated(**_replace(**changes), **options, num_devices=1)


def test_emulated_devices_must_split_tokens_and_experts_evenly():
  from jax_ccfuser.experimental import fused_moe_emulated
  with pytest.raises(ValueError, match=r"x rows 3 and experts 2 must split evenly over 2 "
                                       r"emulated devices"):
    fused_moe_emulated(**_replace(), num_devices=2)


@pytest.mark.parametrize("moe_fn", MOE_FNS, ids=lambda f: f.__name__)
def test_numpy_operands_are_taken_eagerly_as_under_jit(moe_fn):
  """float64 and int64 NumPy operands were refused eagerly but taken under jit, which makes them
  float32 and int32 (no x64); reference_moe took float64 weights eagerly where the others did
  not."""
  args = _replace()
  wide = {name: np.asarray(a, np.int64 if name == "expert_ids" else np.float64)
          for name, a in args.items()}
  eager, traced, narrow = moe_fn(**wide), jax.jit(moe_fn)(**wide), moe_fn(**args)
  assert eager.dtype == traced.dtype == jnp.float32
  np.testing.assert_array_equal(eager, narrow)
  np.testing.assert_array_equal(traced, narrow)


@pytest.mark.parametrize("moe_fn", MOE_FNS, ids=lambda f: f.__name__)
def test_numpy_ids_past_int32_are_refused_not_wrapped(moe_fn):
  """An int64 id of 2^32 + 1 became expert 1 when cast to int32 (no error, while any other
  out-of-range id raises). `jax.jit` itself casts its arguments before the call sees them."""
  args = _replace()
  wide = np.asarray(args["expert_ids"], np.int64)
  wide[0, 0] = 2**32 + 1
  with pytest.raises(ValueError,
                     match=r"expert_ids holds values outside int32 \(0 to 4294967297\)"):
    moe_fn(**{**args, "expert_ids": wide})


def test_router_and_planner_take_operands_as_the_moe_ops_do():
  ids = jnp.zeros((6, 2), jnp.int32)
  for call, match in [
      (lambda: ccf.route([[0.0, 1.0]], 1), r"logits must be an array \(jax or numpy\), got list"),
      (lambda: ccf.route(jnp.zeros((3, 2)), 1, expert_bias=[0.0, 0.0]),
       r"expert_bias must be an array \(jax or numpy\), got list"),
      (lambda: ccf.reassign(ids.tolist(), 4),
       r"expert_ids must be an array \(jax or numpy\), got list"),
      (lambda: ccf.reassign(np.full((6, 2), 2**32 + 1), 4), "expert_ids holds values outside"),
      (lambda: ccf.reassign(ids, 4, tile=2**31), r"tile must be in \[1, 2\^31\)"),
      (lambda: ccf.reassign(ids, 4, threshold=True), "threshold a number >= 1.0, got 32 and True")]:
    with pytest.raises(ValueError, match=match):
      call()
  plan = ccf.reassign(np.asarray(ids, np.int64), 4)  # int64 NumPy ids in range: as under jit
  np.testing.assert_array_equal(ccf.plan_loads(plan), ccf.plan_loads(ccf.reassign(ids, 4)))


def test_reference_marks_an_out_of_range_id_nan_as_fused_moe_refuses_it():
  """The ground truth indexed the experts with the id, which clamps: expert_ids = E computed
  expert E - 1's FFN (and -1 wrapped to it) where fused_moe raises. Inside shard_map too."""
  case = Case(devices=4, tokens=5)
  x, ids, weights, w_in, w_out = make_inputs(case)
  want = np.asarray(reference_moe(x, ids, weights, w_in, w_out))
  for bad in (-1, case.num_experts, 2**31 - 1):
    bad_ids = ids.at[7, 1].set(bad)
    for got in (reference_moe(x, bad_ids, weights, w_in, w_out),
                sharded(reference_moe, case.devices)(x, bad_ids, weights, w_in, w_out)):
      got = np.asarray(got)
      assert np.isnan(got[7]).all(), bad
      np.testing.assert_allclose(np.delete(got, 7, 0), np.delete(want, 7, 0), rtol=1e-6,
                                 atol=1e-6)


def test_a_plan_of_other_dtypes_or_shapes_is_refused_at_trace_time():
  """A plan cast tree-wide (mixed precision's astype) or cut passed the trace and failed in the
  handler with an FFI decode error that never named the plan."""
  x, ids, weights, w_in, w_out = make_inputs(_CASE)
  plan = jax.jit(lambda i: reassign(i, 2))(ids)
  bad_plans = {"float32": jax.tree.map(lambda a: a.astype(jnp.float32), plan),
               "bounds": plan._replace(bounds=plan.bounds[:, :-1]),
               "rank": plan._replace(workers=plan.workers[:, 0])}
  for name, bad in bad_plans.items():
    with pytest.raises(ValueError, match=r"plan must hold int32 workers \[E, S \+ 1\]"):
      jax.jit(fused_moe).lower(x, ids, weights, w_in, w_out, plan=bad)
  np.testing.assert_array_equal(fused_moe(x, ids, weights, w_in, w_out, plan=plan),
                                fused_moe(x, ids, weights, w_in, w_out))


@pytest.mark.parametrize("moe_fn", MOE_FNS, ids=lambda f: f.__name__)
def test_faults_found_at_trace_time(moe_fn):
  traced = jax.jit(functools.partial(moe_fn, activation="gelu"))
  with pytest.raises(ValueError, match=r"w_in must be \[2, 4, 5\]"):
    traced(**_replace())


@pytest.mark.parametrize("entry", ["fused_moe", "fused_moe_emulated"])
def test_gpu_limits_found_at_trace_time(entry, monkeypatch):
  """On GPU, bfloat16/float16 need H and F multiples of 8, and K is at most 3072: trace-time
  ValueErrors, not run-time errors from the handler (the shapes are static). Traced for "gpu" by
  stubbing the platform lookup: the check itself is plain Python, and the trace stops before any
  kernel."""
  from jax_ccfuser import _topology
  from jax_ccfuser.experimental import fused_moe_emulated
  monkeypatch.setattr(_topology, "platform", lambda split=None: "gpu")
  fn = fused_moe if entry == "fused_moe" else functools.partial(fused_moe_emulated,
                                                                  num_devices=1)
  args = _replace(**{name: a.astype(jnp.bfloat16) for name, a in _replace().items()
                     if name in ("x", "w_in", "w_out")})
  with pytest.raises(ValueError, match=r"on GPU needs H and F to be multiples of 8 for "
                                       r"bfloat16; got H=4, F=5"):
    jax.jit(fn).trace(**args)
  tokens, experts = args["x"].shape[0], args["w_in"].shape[0]
  for k, fits in ((GPU_MAX_TOP_K, True), (GPU_MAX_TOP_K + 1, False)):
    routing = dict(expert_ids=jnp.asarray(_rng.integers(0, experts, (tokens, k)), jnp.int32),
                   expert_weights=_array((tokens, k)))
    if fits:
      jax.jit(fn).trace(**_replace(**routing))
    else:
      with pytest.raises(ValueError, match=rf"at most 3072 routing choices per token; got K={k}"):
        jax.jit(fn).trace(**_replace(**routing))
  # float32 has no such limit, and neither has the CPU.
  jax.jit(fn).trace(**_replace())
  monkeypatch.setattr(_topology, "platform", lambda split=None: "cpu")
  jax.jit(fn).trace(**args)


def test_gpu_group_limits_found_at_trace_time(monkeypatch):
  """On GPU, a call's group has at most 8 devices and one work list at most 1024 experts x plan
  slots (a device's own experts; the group's when emulated or under a plan with helpers):
  trace-time ValueErrors that name the largest plan that fits, not run-time errors from the
  handler. Traced for "gpu" by stubbing the platform lookup."""
  from jax_ccfuser import _topology
  from jax_ccfuser.experimental import fused_moe_emulated
  monkeypatch.setattr(_topology, "platform", lambda split=None: "gpu")
  small = dict(hidden=8, ffn=8, k=2)

  def at_limit(trace, fitting, over, match):
    trace(fitting)
    with pytest.raises(ValueError, match=match):
      trace(over)

  def emulated(experts, devices=1):  # one emulated device: all its experts in one list
    args = make_inputs(Case(devices=devices, tokens=4, experts_local=experts, **small))
    jax.jit(functools.partial(fused_moe_emulated, num_devices=devices)).trace(*args)

  at_limit(emulated, 1024, 1025, r"at most 1024 experts x plan slots in one work list; this "
                                 r"call's has 1025 experts x 1 slots")
  at_limit(functools.partial(emulated, 1), 8, 9,
           r"groups of at most 8 devices; this call's has 9")

  def planned(x, ids, weights, w_in, w_out, axis_name):  # reassign's default: S = D = 4 slots
    plan = reassign(ids, w_out.shape[0] * 4, axis_name=axis_name)
    return fused_moe(x, ids, weights, w_in, w_out, axis_name=axis_name, plan=plan)

  def sharded(experts_local, layer=planned):  # 4 * E_local experts x 4 slots under the plan
    args = make_inputs(Case(devices=4, tokens=4, experts_local=experts_local, **small))
    jax.jit(shard_ep(layer, 4)).trace(*args)

  at_limit(sharded, 64, 65, r"this call's has 260 experts x 4 slots: make the plan with "
                            r"reassign\(max_helpers=2\)")
  # Without a plan, each device's list holds its own 65 experts.
  sharded(65, lambda *a, axis_name: fused_moe(*a, axis_name=axis_name))
  # Peers in other processes (a multi-process job) take no plan with helpers on GPU.
  check_gpu_group(2, 2, 1, emulated=False, across_processes=True)
  with pytest.raises(ValueError, match=r"no reassignment plan with helper slots \(2 here\) "
                                       r"where the group's devices live in several processes"):
    check_gpu_group(2, 2, 2, emulated=False, across_processes=True)


def test_gpu_limits_are_the_kernels():
  """The trace-time limits are the ones the CUDA handler checks (cuda/config.cuh)."""
  config = (pathlib.Path(__file__).parents[1] / "cuda" / "config.cuh").read_text()
  for name, value in (("kMaxTopK", GPU_MAX_TOP_K), ("kMaxPeers", GPU_MAX_PEERS),
                      ("kMaxExpertsHere", GPU_MAX_EXPERTS_HERE)):
    assert re.search(rf"constexpr int {name} = (\d+);", config).group(1) == str(value), name


@pytest.mark.parametrize("capacity_factor", [0.0, -1.25, float("nan"), True, np.True_])
def test_bad_capacity_factor(capacity_factor):
  with pytest.raises(ValueError, match="capacity_factor must be a positive float or None"):
    all_to_all_moe(**_replace(), capacity_factor=capacity_factor)


def test_axis_size():
  assert axis_size(None) == 1
  sizes = jax.shard_map(lambda x: jnp.full((1,), axis_size("ep")), mesh=ep_mesh(4),
                        in_specs=P("ep"), out_specs=P("ep"))(jnp.zeros(4))
  np.testing.assert_array_equal(sizes, [4, 4, 4, 4])
  with pytest.raises(ValueError, match=r"axis_name='ep' is not bound here"):
    axis_size("ep")


def test_check_num_experts():
  assert check_num_experts(8, 4) == 2
  assert check_num_experts(3, 1) == 3
  with pytest.raises(ValueError, match=r"num_experts=6 is not divisible by the expert-parallel "
                                       r"axis size 4"):
    check_num_experts(6, 4)
  for bad in (0, -4, 2.0, None):
    with pytest.raises(ValueError, match=f"num_experts must be a positive int, got {bad!r}"):
      check_num_experts(bad, 2)


@pytest.mark.parametrize("num_devices", [0, -2, 2.0, None])
def test_emulated_devices_must_be_a_positive_int(num_devices):
  from jax_ccfuser.experimental import fused_moe_emulated
  with pytest.raises(ValueError, match=f"num_devices must be a positive int, got "
                                       f"{num_devices!r}"):
    fused_moe_emulated(**_replace(), num_devices=num_devices)


def test_all_to_all_bytes_needs_the_experts_split_evenly():
  from jax_ccfuser import all_to_all_bytes
  assert all_to_all_bytes(8, 2, 8, 4, 16, 4) == 2 * 3 * 2 * 16 * 16 * 4
  with pytest.raises(ValueError, match="num_experts=10 is not divisible by the expert-parallel "
                                       "axis size 4"):
    all_to_all_bytes(8, 2, 10, 4, 16, 4)
  with pytest.raises(ValueError, match="num_devices must be a positive int, got 0"):
    all_to_all_bytes(8, 2, 8, 0, 16, 4)
  for name, position, bad in [("tokens", 0, -4), ("tokens", 0, 4.5), ("k", 1, 0),
                              ("hidden", 4, -1), ("itemsize", 5, True)]:
    args = [8, 2, 8, 4, 16, 4]
    args[position] = bad
    with pytest.raises(ValueError, match=f"{name} must be a positive int, got {bad!r}"):
      all_to_all_bytes(*args)


@pytest.mark.parametrize("moe_fn", MOE_FNS, ids=lambda f: f.__name__)
def test_operands_split_over_explicit_axes_need_an_axis_or_a_shard_map(moe_fn):
  """axis_name=None takes every operand whole; tokens split over an explicit mesh axis (as
  jax.make_mesh makes them by default) say the call should run on each device's part, which only
  a shard_map can say: a clear error rather than a sharding-rule failure inside the op."""
  args = make_inputs(Case(devices=1, tokens=8, hidden=4, ffn=5, experts_local=4, k=2))
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  tokens = jax.sharding.NamedSharding(mesh, P("data"))
  split = [jax.device_put(a, tokens) for a in args[:3]] + list(args[3:])
  with jax.set_mesh(mesh), pytest.raises(
      ValueError, match=re.escape("x is split over the explicit mesh axes ['data'], but "
                                  "axis_name=None takes")):
    jax.jit(moe_fn)(*split)


@pytest.mark.parametrize("bad, match", [
    ({"residuals": "kept"}, r"residuals must be one of"),
    ({"plan": {"workers": None}}, r"plan must come from jax_ccfuser.reassign, got dict"),
])
def test_a_call_with_no_tokens_is_checked_as_one_with_tokens(bad, match):
  """The empty case returns only after the arguments are checked: a fault found in a run with
  tokens is never hidden by a batch that happens to be empty."""
  case = Case(devices=2, tokens=0, hidden=4, ffn=5, experts_local=2, k=2, seed=3)
  _, ids, weights, w_in, w_out = make_inputs(case)
  x = jnp.zeros((0, 4))
  from jax_ccfuser.experimental import fused_moe_emulated
  with pytest.raises(ValueError, match=match):
    sharded(fused_moe, 2, **bad)(x, ids, weights, w_in, w_out)
  with pytest.raises(ValueError, match=match):
    fused_moe_emulated(x, ids, weights, w_in, w_out, num_devices=2, **bad)


def test_gpu_backward_under_a_plan_keeps_its_partials_within_half_the_scratch_budget(
    monkeypatch):
  """On GPU a backward under a plan of S helpers keeps S + 1 float32 weight gradients of each of
  its experts in scratch: past half the budget, tracing the gradient fails and says what to
  change, rather than running chunks of one M-tile. Traced for "gpu" by stubbing the platform
  lookup (the trace stops before any kernel); a forward alone, a backward of frozen experts
  (no weight gradient wanted) and the CPU keep none."""
  import jax_ccfuser as ccf
  from jax_ccfuser import _topology
  from jax_ccfuser.experimental import fused_moe_emulated
  case = Case(devices=2, tokens=32, hidden=16, ffn=8, experts_local=2, k=2, skew=1.0, seed=5)
  args = make_inputs(case)

  def layer(x, ids, weights, w_in, w_out, axis_name):
    plan = ccf.reassign(ids, case.num_experts, axis_name=axis_name)  # S = D = 2 slots
    return fused_moe(x, ids, weights, w_in, w_out, axis_name=axis_name, plan=plan)

  def emulated(x, ids, weights, w_in, w_out):  # both devices' blocks on one: partials twice
    return fused_moe_emulated(x, ids, weights, w_in, w_out, num_devices=case.devices,
                              plan=emulated_plan(ids, case.num_experts, case.devices))

  # Per device, 2 experts x 2 slots x (16 * 16 + 8 * 16) floats: 6144 bytes, twice emulated.
  for fn, partials in ((shard_ep(layer, case.devices), 6144), (emulated, 2 * 6144)):
    # A new jit each time: the budget is fixed when a call is traced, and jit keeps its traces.
    trace_grad = lambda argnums=(0, 3, 4): jax.jit(jax.grad(
        lambda *a: jnp.sum(fn(*a) ** 2), argnums=argnums)).trace(*args)
    monkeypatch.setattr(_topology, "platform", lambda split=None: "gpu")
    with ccf.scratch_budget(2 * partials):
      trace_grad()
    with ccf.scratch_budget(2 * partials - 1):
      jax.jit(fn).trace(*args)
      trace_grad(argnums=(0, 2))
      with pytest.raises(ValueError, match=(
          rf"plan with 2 slots keeps float32 weight gradients of each of its "
          rf"{partials // 3072} experts once per slot, {partials:,} bytes of scratch: more than "
          rf"half the scratch budget \({2 * partials - 1:,} bytes\)\. Raise "
          rf"jax_ccfuser.scratch_budget to at least {2 * partials:,} bytes, or use no plan "
          rf"\(no plan with helpers fits\)")):
        trace_grad()
      monkeypatch.setattr(_topology, "platform", lambda split=None: "cpu")
      trace_grad()


def test_plan_partials_advice_fits_the_budget():
  """At a Mixtral-8x7B shape on 8 GPUs (one expert each, S = 8 slots: 704,643,072 bytes a slot),
  the refusal names the most helpers half the budget holds, or no plan where none fits."""
  from jax_ccfuser import _fused
  w_in = jax.ShapeDtypeStruct((1, 4096, 2 * 14336), jnp.bfloat16)
  w_out = jax.ShapeDtypeStruct((1, 14336, 4096), jnp.bfloat16)
  static = lambda budget: _fused._Static(site=0, num_devices=8, emulated=False,
                                         activation="swiglu", timeout_ms=1, num_experts=8,
                                         plan_slots=8, platform="gpu",
                                         scratch_budget=budget)
  for budget, advice in ((2 << 30, r"use no plan \(no plan with helpers fits\)"),
                         (4 << 30, r"make the plan with reassign\(max_helpers=2\)")):
    with pytest.raises(ValueError, match=r"5,637,144,576 bytes of scratch.*at least "
                                         r"11,274,289,152 bytes, or " + advice):
      _fused._check_plan_partials(static(budget), w_in, w_out)
  _fused._check_plan_partials(static(11_274_289_152), w_in, w_out)
  _fused._check_plan_partials(static(1)._replace(platform="cpu"), w_in, w_out)
  # Peers in other processes: the handler refuses a plan with helpers there, whatever the budget.
  _fused._check_plan_partials(static(1)._replace(devices=tuple(range(8))), w_in, w_out)


def test_symbolic_shapes_in_a_shard_map_are_refused_while_tracing():
  """jax.export with a symbolic token count traced fused_moe in a shard_map, and XLA's shape
  refinement then crashed the process compiling it (a segmentation fault)."""
  from jax import export
  t, = export.symbolic_shape("t")
  case = Case(devices=4, tokens=4)
  x, ids, weights, w_in, w_out = make_inputs(case)
  specs = [jax.ShapeDtypeStruct((case.devices * t, *a.shape[1:]), a.dtype)
           for a in (x, ids, weights)] + [jax.ShapeDtypeStruct(a.shape, a.dtype)
                                         for a in (w_in, w_out)]
  layer = jax.jit(shard_ep(fused_moe, case.devices))
  with pytest.raises(ValueError, match=r"fused_moe in a shard_map takes static shapes .*got "
                                       r"\[\(t, 16\), \(t, 2\)"):
    export.export(layer, disabled_checks=[export.DisabledSafetyCheck.custom_call(name)
                                          for name in ("ccf_moe_fwd", "ccf_moe_bwd")])(*specs)
