"""fused_moe under stress: random problems, bad input, missing and failing peers, concurrent call
sites, non-finite values and a long training run.

The README's table of errors is made from the faults below: run
`.venv/bin/python tests/test_hardening.py` to regenerate it; `test_readme_error_table` fails when
the table and the errors raised part ways.
"""

import dataclasses
import functools
import pathlib
import re
import threading
from typing import Callable, NamedTuple

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import psutil
import pytest
from jax.sharding import PartitionSpec as P

import jax_ccfuser as ccf
from jax_ccfuser import _extension
from moe_cases import Case, assert_close, ep_mesh, make_inputs

# A missing or failing peer must surface within this many seconds of wall time (the peer timeout
# of these tests is 1 s; the rest is slack for compiling on busy cores). Only a hang exceeds it.
_NO_HANG_S = 30.0
_TEST_PEER_TIMEOUT_S = 1.0


def _sharded(body, devices: int, in_specs=P("ep"), out_specs=P("ep")):
  """`body(*args, axis_name="ep")` under `shard_map` over the first `devices` devices."""
  return jax.shard_map(functools.partial(body, axis_name="ep"), mesh=ep_mesh(devices),
                       in_specs=in_specs, out_specs=out_specs)


def _bounded(fn):
  """`fn()`, traced under the tests' peer timeout, run on a daemon thread.

  Returns what `fn` returns and raises what it raises; fails the test if `fn` still runs after
  `_NO_HANG_S` seconds, so a hang is a failure, not a stuck test run.
  """
  outcome = {}

  def target():
    try:
      with ccf.peer_timeout(_TEST_PEER_TIMEOUT_S):
        outcome["value"] = fn()
    except Exception as e:  # noqa: BLE001 (raised again in the test's thread)
      outcome["error"] = e

  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  thread.join(_NO_HANG_S)
  assert not thread.is_alive(), f"still running after {_NO_HANG_S} s: a peer wait hangs"
  if "error" in outcome:
    raise outcome["error"]
  return outcome["value"]


def _error_of(result):
  """The run-time error computing `result` raised, or None."""
  try:
    jax.block_until_ready(result)
  except jax.errors.JaxRuntimeError as e:
    return e
  return None


def _make_forward_and_grads(moe_fn, devices: int, activation: str = "swiglu",
                           with_plan: bool = False):
  """A jitted `(x, ids, weights, w_in, w_out, dy) -> (y, (dx, d_weights, dw_in, dw_out))`.

  The peer timeout in force when it is first called stays with it (see `ccf.peer_timeout`).
  """
  def moe(x, ids, weights, w_in, w_out, axis_name):
    plan = None
    if with_plan:
      num_experts = w_out.shape[0] * jax.lax.axis_size(axis_name)
      plan = ccf.reassign(ids, num_experts, axis_name=axis_name, tile=4)
    return moe_fn(x, ids, weights, w_in, w_out, axis_name=axis_name, activation=activation,
                  plan=plan)

  layer = _sharded(moe, devices)

  def run(x, ids, weights, w_in, w_out, dy):
    y, pullback = jax.vjp(lambda x, w, a, b: layer(x, ids, w, a, b), x, weights, w_in, w_out)
    return y, pullback(dy.astype(y.dtype))

  return jax.jit(run)


# One per static configuration, traced under the default peer timeout: jit then keeps one
# executable per shape, so repeated shapes compile once.
_forward_and_grads = functools.lru_cache(maxsize=None)(_make_forward_and_grads)


def _float32(*arrays):
  """The float arrays cast to float32 (the reference's precision), int32 ids as they are."""
  return [a if a.dtype == jnp.int32 else a.astype(jnp.float32) for a in arrays]


def _assert_grads_close(grads, grads_ref, dtype, names):
  """Each gradient against the reference's, named in the failure message."""
  for name, a, b in zip(names, grads, grads_ref, strict=True):
    try:
      # Gradients sum over many rows: the tolerance grows with the reference's magnitude.
      assert_close(a, b, dtype, max(1.0, float(jnp.max(jnp.abs(b))) / 4))
    except AssertionError as e:
      raise AssertionError(f"{name}: {e}") from None


def _assert_loss_and_grads_close(out, out_ref, names):
  """`(loss, grads)` of a float32 step against the reference step's."""
  assert_close(out[0], out_ref[0], jnp.float32, 10.0)
  _assert_grads_close(out[1], out_ref[1], jnp.float32, names)


def _assert_matches_reference(fused_out, args, devices, activation, dtype):
  """`fused_out` (y and grads of `_forward_and_grads`) against reference_moe in float32."""
  y, grads = fused_out
  y_ref, grads_ref = _forward_and_grads(ccf.reference_moe, devices, activation)(*_float32(*args))
  assert y.dtype == args[0].dtype
  assert_close(y, y_ref, dtype)
  _assert_grads_close(grads, grads_ref, dtype, ("dx", "d_weights", "dw_in", "dw_out"))


# ---------------------------------------------------------------------------------------------
# Random problems against the reference.

_ROUTINGS = ("sampled", "repeated", "one_device")


@st.composite
def _problems(draw):
  """A `Case`, a routing rewrite, the combine weights' dtype and whether to use a plan."""
  size = st.integers(1, 8)
  case = Case(devices=draw(st.sampled_from([1, 2, 4, 8])), tokens=draw(size), hidden=draw(size),
              ffn=draw(size), experts_local=draw(size), k=draw(size),
              dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
              activation=draw(st.sampled_from(["swiglu", "geglu", "gelu", "relu", "silu"])),
              skew=draw(st.sampled_from([0.0, 0.5, 1.0])), seed=draw(st.integers(0, 2**16)))
  routing, float32_weights, with_plan = (draw(st.sampled_from(_ROUTINGS)), draw(st.booleans()),
                                         draw(st.booleans()))
  return case, routing, float32_weights, with_plan and case.devices > 1


def _route(ids, routing: str, case: Case):
  """`ids` rewritten: "repeated" gives every row K copies of one id (each counts), "one_device"
  sends every row to the last device's experts; "sampled" keeps the (possibly skewed) draw."""
  if routing == "repeated":
    return jnp.broadcast_to(ids[:, :1], ids.shape)
  if routing == "one_device":
    return (case.devices - 1) * case.experts_local + ids % case.experts_local
  return ids


@hypothesis.settings(max_examples=12, deadline=None, derandomize=True, database=None,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(_problems())
# Corners a dozen random draws may miss: 8 devices, K=8 and a plan moving a hot expert's rows;
# bfloat16 with bfloat16 combine weights; every row to one device.
@hypothesis.example((Case(devices=8, tokens=8, hidden=8, ffn=8, experts_local=2, k=8, skew=1.0,
                          seed=1), "sampled", True, True))
@hypothesis.example((Case(devices=4, tokens=8, hidden=6, ffn=5, experts_local=8, k=3,
                          dtype=jnp.bfloat16, activation="geglu", skew=0.5, seed=2), "repeated",
                     False, True))
@hypothesis.example((Case(devices=2, tokens=3, hidden=8, ffn=2, experts_local=1, k=8,
                          activation="relu", seed=3), "one_device", True, True))
def test_random_problems_match_reference(problem):
  case, routing, float32_weights, with_plan = problem
  x, ids, weights, w_in, w_out = make_inputs(case)
  ids = _route(ids, routing, case)
  if not float32_weights:
    weights = weights.astype(case.dtype)
  dy = jnp.asarray(np.random.default_rng(case.seed).standard_normal(x.shape), case.dtype)
  args = (x, ids, weights, w_in, w_out, dy)
  out = _forward_and_grads(ccf.fused_moe, case.devices, case.activation, with_plan)(*args)
  assert out[1][1].dtype == weights.dtype
  _assert_matches_reference(out, args, case.devices, case.activation, case.dtype)


# ---------------------------------------------------------------------------------------------
# Bad input and failures: each fault, the error it raises, and the README table made from them.

# Small enough to read in an error message: 2 devices, T=3, H=4, F=5, E_local=2, K=2, swiglu.
_FAULT_CASE = Case(devices=2, tokens=3, hidden=4, ffn=5, experts_local=2, k=2)


class _Fault(NamedTuple):
  """A bad input: `make()` gives a jitted function and its arguments; `arm()` runs just before
  the compiled function (after tracing), for faults injected at run time."""
  what: str
  make: Callable[[], tuple]
  arm: Callable[[], None] = lambda: None


def _fused_on_fault_case(**changes):
  """`fused_moe` over 2 devices, with some of `_FAULT_CASE`'s arguments (or options) changed."""
  names = ("x", "expert_ids", "expert_weights", "w_in", "w_out")
  args = dict(zip(names, make_inputs(_FAULT_CASE)))
  options = {k: changes.pop(k) for k in ("activation", "plan") if k in changes}
  args.update(changes)
  layer = _sharded(lambda *a, axis_name: ccf.fused_moe(*a, axis_name=axis_name, **options), 2)
  return jax.jit(layer), tuple(args[n] for n in names)


def _with_id(value):
  """`_FAULT_CASE`'s ids with token 1, slot 1 of device 1 set to `value`."""
  ids = make_inputs(_FAULT_CASE)[1]
  return ids.at[_FAULT_CASE.tokens + 1, 1].set(value)


def _reassign_ten_experts_over_four():
  layer = _sharded(lambda ids, axis_name: ccf.reassign(ids, 10, axis_name=axis_name).workers, 4)
  return jax.jit(layer), (jnp.zeros((8, 2), jnp.int32),)


def _outside_shard_map():
  return jax.jit(functools.partial(ccf.fused_moe, axis_name="ep")), make_inputs(_FAULT_CASE)


def _missing_peer():
  """`fused_moe` in one branch of a `lax.cond` that device 0 does not take."""
  def body(x, ids, weights, w_in, w_out, axis_name):
    return jax.lax.cond(jax.lax.axis_index(axis_name) == 0, lambda: x,
                        lambda: ccf.fused_moe(x, ids, weights, w_in, w_out, axis_name=axis_name))
  return jax.jit(_sharded(body, 2)), make_inputs(_FAULT_CASE)


FAULTS = [
    _Fault("expert id >= E (E = 4)", lambda: _fused_on_fault_case(expert_ids=_with_id(4))),
    _Fault("negative expert id", lambda: _fused_on_fault_case(expert_ids=_with_id(-1))),
    _Fault("`x` of rank 3 (`[1, 6, 4]` per device)",
           lambda: _fused_on_fault_case(x=jnp.zeros((2, 6, 4), jnp.float32))),
    _Fault("`expert_ids` of dtype float32",
           lambda: _fused_on_fault_case(expert_ids=jnp.zeros((6, 2), jnp.float32))),
    _Fault("`x` of dtype int32", lambda: _fused_on_fault_case(x=jnp.zeros((6, 4), jnp.int32))),
    _Fault("float16 `expert_weights` with float32 `x`",
           lambda: _fused_on_fault_case(expert_weights=jnp.ones((6, 2), jnp.float16))),
    _Fault("`expert_ids` with 4 rows per device, `x` with 3",
           lambda: _fused_on_fault_case(expert_ids=jnp.zeros((8, 2), jnp.int32))),
    _Fault("`w_in` `[E_local, H, F]` for a gated activation",
           lambda: _fused_on_fault_case(w_in=jnp.zeros((4, 4, 5), jnp.float32))),
    _Fault("`w_out` with another H than `x`",
           lambda: _fused_on_fault_case(w_out=jnp.zeros((4, 5, 3), jnp.float32))),
    _Fault("E not divisible by the devices: `reassign(ids, 10, axis_name=...)` over 4",
           _reassign_ten_experts_over_four),
    _Fault("unknown activation", lambda: _fused_on_fault_case(activation="tanh")),
    _Fault("`plan` not made by `reassign`", lambda: _fused_on_fault_case(plan={"workers": 0})),
    _Fault("`axis_name` given outside `shard_map`", _outside_shard_map),
    _Fault("missing peer: device 0 takes another `lax.cond` branch", _missing_peer),
    _Fault("failing peer: device 1's call fails after publishing its buffers (the test hook "
           "`fail_next_call_for_testing(1)`; device 0 times out at the compute barrier)",
           lambda: _fused_on_fault_case(),
           arm=lambda: _extension.cpu.fail_next_call_for_testing(1)),
]


class _Raised(NamedTuple):
  when: str  # "tracing" or "running"
  error: Exception


def _trigger(fault: _Fault) -> _Raised:
  """Traces, compiles and runs `fault`'s function; the error it raises and at which stage."""
  fn, args = fault.make()
  with ccf.peer_timeout(_TEST_PEER_TIMEOUT_S):
    try:
      compiled = fn.lower(*args).compile()
    except ValueError as e:
      return _Raised("tracing", e)
    fault.arm()
    error = _bounded(lambda: _error_of(compiled(*args)))
  if error is None:
    raise AssertionError(f"{fault.what}: no error raised")
  return _Raised("running", error)


_README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
_MARKERS = ("<!-- errors:start -->\n", "<!-- errors:end -->")

_INTRO = """\
## Bad input and failures

What each fault raises, as recorded by running it (2 devices, `T=3`, `H=4`, `F=5`, `E_local=2`,
`K=2`, swiglu, `ccf.peer_timeout(1.0)`; `tests/test_hardening.py` regenerates this table when run
as a script, and fails when the table and the errors part ways). Shapes, dtypes and options are
checked while tracing (a `ValueError` from the call); values are checked by the kernels, so a bad
expert id raises `jax.errors.JaxRuntimeError` when the result is computed (every device checks
every id before it computes anything). A device whose peer never arrives, or fails midway, stops
waiting after the peer timeout (default 300 s, `JAX_CCFUSER_PEER_TIMEOUT`, or
`ccf.peer_timeout(seconds)` around the tracing) and raises `DEADLINE_EXCEEDED`; the caller gets
one device's error (a failing device's own, when one failed). Nothing hangs, and the next call of
the same function works.
"""


def _cell(text: str) -> str:
  """`text` safe inside a markdown table cell."""
  return text.replace("|", "\\|")


def error_table() -> str:
  """The README section between the errors markers, made by triggering every fault."""
  rows = ["| Fault | Raised while | Error |", "|---|---|---|"]
  for fault in FAULTS:
    raised = _trigger(fault)
    rows.append(f"| {_cell(fault.what)} | {raised.when} | `{type(raised.error).__name__}`: "
                f"`{_cell(str(raised.error))}` |")
  return _INTRO + "\n" + "\n".join(rows) + "\n"


def _readme_section(text: str) -> tuple[int, int]:
  """Start and end offsets of the text between the errors markers in `text`."""
  start = text.index(_MARKERS[0]) + len(_MARKERS[0])
  return start, text.index(_MARKERS[1], start)


def test_readme_error_table():
  text = _README.read_text()
  start, end = _readme_section(text)
  assert text[start:end] == error_table(), (
      "README.md's error table differs from the errors raised; regenerate it with "
      "`.venv/bin/python tests/test_hardening.py`")


# ---------------------------------------------------------------------------------------------
# Missing and failing peers: the others raise (for a missing one, after the timeout), nothing
# hangs, the next call works.


def _failing_then_following(failing, following):
  """Dispatches `failing()` and then, before its failure can show, `following()`.

  Returns:
    `failing`'s error and `following`'s result.
  """
  failed = failing()
  return _error_of(failed), jax.block_until_ready(following())


def _missing_ranks(error):
  """The ranks a peer-timeout error names as never arrived; [] for other errors.

  Besides the device that is missing, it may name one that arrived a moment earlier and gave up
  (withdrew its arrival) before the device whose error is reported.
  """
  named = re.search(r"never arrived:((?: \d+)+)\.", str(error))
  return [int(r) for r in named[1].split()] if named else []


_PEER_CASE = Case(devices=4, tokens=12, seed=21)


def _peer_args(case=_PEER_CASE):
  """`make_inputs(case)` and a cotangent dy `[D*T, H]` float32."""
  x, ids, weights, w_in, w_out = make_inputs(case)
  dy = jnp.asarray(np.random.default_rng(case.seed).standard_normal(x.shape), jnp.float32)
  return x, ids, weights, w_in, w_out, dy


def _step_with_skips():
  """A jitted forward + backward over 4 devices in which the device whose rank equals the
  `skip_forward` (`skip_backward`) input takes another `lax.cond` branch around the forward
  (backward) call: the same executable, and the same call sites, run with and without a
  missing peer."""
  def body(x, ids, weights, w_in, w_out, dy, skip_forward, skip_backward, axis_name):
    me = jax.lax.axis_index(axis_name)

    def moe(*a):
      return ccf.fused_moe(a[0], ids, *a[1:], axis_name=axis_name)

    def forward(*a):
      return jax.lax.cond(me == skip_forward, lambda: a[0], lambda: moe(*a))

    y, pullback = jax.vjp(forward, x, weights, w_in, w_out)
    zeros = tuple(jnp.zeros_like(a) for a in (x, weights, w_in, w_out))
    grads = jax.lax.cond(me == skip_backward, lambda: zeros, lambda: pullback(dy))
    return y, grads

  return jax.jit(_sharded(body, 4, in_specs=(P("ep"),) * 6 + (P(), P())))


@pytest.mark.parametrize("phase,missing", [("forward", 3), ("backward", 1)])
def test_missing_peer_raises_after_timeout_then_same_call_works(phase, missing):
  """Device `missing` skips the forward (backward) call; the others raise after the timeout.
  A call dispatched right behind it, on other inputs, is not paired with the failed one."""
  args, following_args = _peer_args(), _peer_args(dataclasses.replace(_PEER_CASE, seed=22))
  step = _step_with_skips()
  skips = (missing, -1) if phase == "forward" else (-1, missing)
  no_skip = (-1, -1)
  error, following = _bounded(lambda: _failing_then_following(
      lambda: step(*args, *map(jnp.int32, skips)),
      lambda: step(*following_args, *map(jnp.int32, no_skip))))
  assert isinstance(error, jax.errors.JaxRuntimeError)
  assert re.match(r"DEADLINE_EXCEEDED: .* waited 1000 ms at the publish barrier;", str(error))
  assert missing in _missing_ranks(error), str(error)
  _assert_matches_reference(following, following_args, 4, "swiglu", jnp.float32)
  # The sites that timed out, on their first inputs, twice: the registry keeps one group per
  # site, however the calls ended.
  counts = []
  for _ in range(2):
    _assert_matches_reference(step(*args, *map(jnp.int32, no_skip)), args, 4, "swiglu",
                              jnp.float32)
    counts.append(_extension.cpu.peer_group_count())
  assert counts[0] == counts[1]


@pytest.mark.parametrize("rank", [0, 3])
def test_failing_peer_in_forward(rank):
  args, following_args = _peer_args(), _peer_args(dataclasses.replace(_PEER_CASE, seed=23))
  step = _make_forward_and_grads(ccf.fused_moe, 4)
  _bounded(lambda: jax.block_until_ready(step(*args)))  # traced under the short timeout
  _extension.cpu.fail_next_call_for_testing(rank)
  error, following = _bounded(lambda: _failing_then_following(lambda: step(*args),
                                                              lambda: step(*following_args)))
  assert isinstance(error, jax.errors.JaxRuntimeError)
  # The failing device still meets its peers at the compute barrier: they all learn its fault,
  # never a timeout.
  assert re.match(rf"INTERNAL: .*jax_ccfuser: injected fault on device {rank}$", str(error)), str(error)
  _assert_matches_reference(following, following_args, 4, "swiglu", jnp.float32)
  _assert_matches_reference(step(*args), args, 4, "swiglu", jnp.float32)


def test_failing_peer_in_backward():
  """The forward ran; device 2's backward call fails after publishing, the others learn it at
  the compute barrier (which device 2 still meets, so its buffers outlive their reads) and
  raise the same error, and the same backward then runs correctly."""
  x, ids, weights, w_in, w_out, dy = args = _peer_args()
  following_dy = 2 * dy[::-1]
  with ccf.peer_timeout(_TEST_PEER_TIMEOUT_S):
    layer = jax.jit(_sharded(lambda *a, axis_name: ccf.fused_moe(*a, axis_name=axis_name), 4))
    # Forward now (its own executable); the backward is a second executable, run by pullback.
    y, pullback = jax.vjp(lambda x, w, a, b: layer(x, ids, w, a, b), x, weights, w_in, w_out)
    jax.block_until_ready(pullback(dy))
  backward = str(jax.make_jaxpr(pullback)(dy))
  assert "ccf_moe_bwd" in backward and "ccf_moe_fwd" not in backward
  _extension.cpu.fail_next_call_for_testing(2)
  error, following = _bounded(lambda: _failing_then_following(lambda: pullback(dy),
                                                              lambda: pullback(following_dy)))
  assert isinstance(error, jax.errors.JaxRuntimeError)
  assert re.match(r"INTERNAL: .*jax_ccfuser: injected fault on device 2$", str(error)), str(error)
  _assert_matches_reference((y, following), (*args[:5], following_dy), 4, "swiglu", jnp.float32)
  _assert_matches_reference((y, pullback(dy)), args, 4, "swiglu", jnp.float32)


# ---------------------------------------------------------------------------------------------
# Several call sites in one step, and one step run from several threads.

# Layer A: H=16, K=2, E_local=2, swiglu. Layer B: H=8, K=3, E_local=3, gelu, F=12.
_LAYER_A = Case(devices=4, tokens=12, hidden=16, ffn=8, experts_local=2, k=2)
_LAYER_B = Case(devices=4, tokens=12, hidden=8, ffn=12, experts_local=3, k=3, activation="gelu")


def _two_layer_inputs(seed):
  """Layer A's and B's routing and weights, the projections between them and a cotangent."""
  x, ids_a, weights_a, w_in_a, w_out_a = make_inputs(dataclasses.replace(_LAYER_A, seed=seed))
  _, ids_b, weights_b, w_in_b, w_out_b = make_inputs(dataclasses.replace(_LAYER_B, seed=seed + 1))
  rng = np.random.default_rng(seed + 2)
  down = jnp.asarray(rng.standard_normal((16, 8)) / 4, jnp.float32)
  up = jnp.asarray(rng.standard_normal((8, 16)) / 3, jnp.float32)
  proj = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  return (x, ids_a, weights_a, w_in_a, w_out_a, ids_b, weights_b, w_in_b, w_out_b, down, up,
          proj)


_TWO_LAYER_GRADS = ("dx", "dw_in_a", "dw_out_a", "dw_in_b", "dw_out_b")


def _two_layer_step(moe_fn):
  """A jitted loss and its gradients through three call sites of two layers in one step.

  Sites 1 (layer A) and 2 (layer B, another shape) are independent, so XLA may run them in
  either order or at once; site 3 (layer A's weights again) depends on both. The backward runs
  them in reverse, interleaved with the forward's residual reads.
  """
  def body(x, ids_a, weights_a, w_in_a, w_out_a, ids_b, weights_b, w_in_b, w_out_b, down, up,
           axis_name):
    layer_a = functools.partial(moe_fn, axis_name=axis_name)
    layer_b = functools.partial(moe_fn, axis_name=axis_name, activation="gelu")
    y1 = layer_a(x, ids_a, weights_a, w_in_a, w_out_a)
    y2 = layer_b(x @ down, ids_b, weights_b, w_in_b, w_out_b)
    return layer_a(y1 + y2 @ up, ids_a[:, ::-1], weights_a, w_in_a, w_out_a)

  model = _sharded(body, 4, in_specs=(P("ep"),) * 9 + (P(), P()))

  def loss(*args):
    *inputs, proj = args
    return jnp.sum(model(*inputs) * proj)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 3, 4, 7, 8)))


def test_two_layers_three_sites_in_one_step():
  args = _two_layer_inputs(31)
  loss, grads = _two_layer_step(ccf.fused_moe)(*args)
  _assert_loss_and_grads_close((loss, grads), _two_layer_step(ccf.reference_moe)(*args),
                               _TWO_LAYER_GRADS)


def test_one_traced_layer_called_twice_in_one_step():
  """A jitted layer called twice inside another jit is traced once, so both of its calls in the
  compiled program (and both backward calls) share one call site and one peer group; every
  device must still meet its peers in the same call, in forward and backward."""
  case = dataclasses.replace(_PEER_CASE, tokens=64, hidden=32, ffn=64, seed=71)
  x, ids, weights, w_in, w_out, dy = _peer_args(case)

  def step(moe_fn):
    layer = jax.jit(_sharded(lambda *a, axis_name: moe_fn(*a, axis_name=axis_name), 4))

    def loss(x, w_in, w_out):
      y = layer(x, ids, weights, w_in, w_out) + 3 * layer(2 * x[::-1], ids, weights, w_in, w_out)
      return jnp.sum(y * dy)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

  fused = step(ccf.fused_moe)
  hlo = fused.lower(x, w_in, w_out).compile().as_text()
  sites = re.findall(r'custom_call_target="ccf_moe_fwd".*?site = (\d+)', hlo)
  assert len(sites) == 2 and sites[0] == sites[1], sites
  reference = step(ccf.reference_moe)(x, w_in, w_out)
  for _ in range(3):
    _assert_loss_and_grads_close(fused(x, w_in, w_out), reference, ("dx", "dw_in", "dw_out"))


def test_steps_from_two_threads_do_not_cross_talk():
  """Two threads run the same two jitted steps on different inputs at once; each gets bitwise
  the results of running alone (fused_moe is deterministic), so no device paired with a device
  of the other thread's execution."""
  # Short enough that a deadlock between the threads' executions ends as an error in the join
  # window below; long enough that a merely slow peer never trips it.
  with ccf.peer_timeout(_NO_HANG_S / 2):
    steps = (_two_layer_step(ccf.fused_moe), _make_forward_and_grads(ccf.fused_moe, 4))
    inputs = [(_two_layer_inputs(seed), _peer_args(dataclasses.replace(_PEER_CASE, seed=seed)))
              for seed in (41, 42)]
    alone = [jax.tree.map(np.asarray, [step(*a) for step, a in zip(steps, args)])
             for args in inputs]
  two_layers_ref = _two_layer_step(ccf.reference_moe)
  for args, (two_layers, one_layer) in zip(inputs, alone):
    _assert_loss_and_grads_close(two_layers, two_layers_ref(*args[0]), _TWO_LAYER_GRADS)
    _assert_matches_reference(one_layer, args[1], 4, "swiglu", jnp.float32)
  failures = []

  def run(thread):
    try:
      for _ in range(15):
        got = [step(*a) for step, a in zip(steps, inputs[thread])]
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, got), alone[thread])
    except Exception as e:  # noqa: BLE001 (reported below)
      failures.append((thread, e))

  threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(2 * _NO_HANG_S)
    assert not t.is_alive(), "a thread's step hangs"
  assert not failures, failures


# ---------------------------------------------------------------------------------------------
# Non-finite values stay with the token that carries them.


@pytest.mark.parametrize("where,value", [("x", np.nan), ("x", np.inf), ("expert_weights", np.nan)])
def test_non_finite_token_stays_in_its_rows(where, value):
  """A NaN/Inf in token t's input reaches y[t], and may reach dx[t], d_weights[t] and the
  weight gradients of t's experts, but nothing else: every other row and expert is finite and
  bitwise the clean run's."""
  case = Case(devices=4, tokens=16, k=2, skew=0.5, seed=51)
  x, ids, weights, w_in, w_out, dy = _peer_args(case)
  token = case.tokens + 5  # device 1's token 5
  if where == "x":
    x_bad, weights_bad = x.at[token, 3].set(value), weights
  else:
    x_bad, weights_bad = x, weights.at[token, 0].set(value)
  step = _forward_and_grads(ccf.fused_moe, 4)
  clean = jax.tree.map(np.asarray, step(x, ids, weights, w_in, w_out, dy))
  dirty = jax.tree.map(np.asarray, step(x_bad, ids, weights_bad, w_in, w_out, dy))
  others = np.arange(x.shape[0]) != token
  experts = np.setdiff1d(np.arange(case.num_experts), np.asarray(ids[token]))
  (y, (dx, d_weights, dw_in, dw_out)), (y0, (dx0, d_weights0, dw_in0, dw_out0)) = dirty, clean
  assert not np.all(np.isfinite(y[token]))
  for name, got, want in (("y", y[others], y0[others]), ("dx", dx[others], dx0[others]),
                          ("d_weights", d_weights[others], d_weights0[others]),
                          ("dw_in", dw_in[experts], dw_in0[experts]),
                          ("dw_out", dw_out[experts], dw_out0[experts])):
    assert np.all(np.isfinite(got)), name
    np.testing.assert_array_equal(got, want, err_msg=name)


# ---------------------------------------------------------------------------------------------
# A long training run.


def test_thousand_training_steps_keep_memory_flat():
  """1,000 Adam steps of a routed MoE layer: after warm-up, resident memory, live arrays, the
  peer registry and the traffic table stay put, and the loss goes down."""
  devices, tokens, hidden, ffn, experts_local, k = 4, 16, 32, 32, 2, 2
  num_experts = devices * experts_local
  rng = np.random.default_rng(61)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  params = dict(router=0.1 * normal(hidden, num_experts),
                w_in=normal(num_experts, hidden, 2 * ffn) / np.sqrt(hidden),
                w_out=normal(num_experts, ffn, hidden) / np.sqrt(ffn))
  batches = [(normal(devices * tokens, hidden), normal(devices * tokens, hidden))
             for _ in range(4)]

  def body(params, x, target, axis_name):
    ids, weights, aux = ccf.route(x @ params["router"], k, axis_name=axis_name)
    y = ccf.fused_moe(x, ids, weights, params["w_in"], params["w_out"], axis_name=axis_name)
    loss = jnp.mean(jnp.square(x + y - target)) + 1e-2 * aux.load_balancing_loss
    return jax.lax.pmean(loss, axis_name)

  specs = dict(router=P(), w_in=P("ep"), w_out=P("ep"))
  loss_fn = _sharded(body, devices, in_specs=(specs, P("ep"), P("ep")), out_specs=P())
  optimizer = optax.adam(1e-3)

  @jax.jit
  def train_step(params, opt_state, x, target):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, target)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = optimizer.init(params)
  process = psutil.Process()
  marks = {}
  for step in range(1000):
    params, opt_state, loss = train_step(params, opt_state, *batches[step % len(batches)])
    if step in (0, 199, 999):
      jax.block_until_ready(loss)
      marks[step] = dict(loss=float(loss), rss=process.memory_info().rss,
                         groups=_extension.cpu.peer_group_count(),
                         arrays=len(jax.live_arrays()), traffic=len(ccf.peer_traffic()))
  warm, end = marks[199], marks[999]
  growth_mb = (end["rss"] - warm["rss"]) / 2**20
  assert growth_mb < 20, f"resident memory grew {growth_mb:.1f} MB from step 200 to 1000"
  for key in ("groups", "arrays", "traffic"):
    assert end[key] == warm[key], (key, warm[key], end[key])
  assert np.isfinite(end["loss"]) and end["loss"] < 0.5 * marks[0]["loss"]


if __name__ == "__main__":
  import conftest  # noqa: F401  (the eight simulated devices the table was made with)

  readme = _README.read_text()
  start, end = _readme_section(readme)
  _README.write_text(readme[:start] + error_table() + readme[end:])
  print(f"wrote the error table into {_README}")
