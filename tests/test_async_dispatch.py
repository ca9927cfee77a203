"""Loops that never wait: deep asynchronous dispatch runs, queued failures fail fast, and
forward-mode autodiff says what works.

Ordinary JAX loops dispatch step after step without waiting; XLA:CPU then holds dozens of
calls in flight per device. These tests run such loops to the end and compare them bitwise with
the same loop waiting on every step.
"""

import os
import re
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jax_ccfuser as ccf
from jax_ccfuser import _cpu_threads
from jax_ccfuser.nnx import MoE
from moe_cases import Case, ep_mesh, make_inputs, sharded

DEVICES = 8


def test_pool_reserved_for_the_devices():
  """Imported after the tests configured 8 devices: XLA got 2 threads per device."""
  assert int(os.environ["PJRT_NPROC"]) >= 2 * DEVICES or _cpu_threads._cores() >= 2 * DEVICES


def test_small_pool_warns(monkeypatch):
  monkeypatch.setenv("PJRT_NPROC", "3")
  monkeypatch.setattr(_cpu_threads, "_warned", set())
  with pytest.warns(RuntimeWarning, match=r"PJRT_NPROC=10"):
    _cpu_threads.check_pool(5)
  monkeypatch.setenv("PJRT_NPROC", "10")
  monkeypatch.setattr(_cpu_threads, "_warned", set())
  _cpu_threads.check_pool(5)  # enough: no warning (pytest's filter turns one into an error)


def test_more_devices_raise_the_pool_reserved_at_import_but_not_a_users(monkeypatch):
  """`--devices 16` in the demo warned: the pool reserved at import holds 8 devices. The
  reservation can be raised before the backend starts; a user's own setting never is."""
  monkeypatch.setattr(_cpu_threads._jax_internals, "backends_initialized", lambda: False)
  monkeypatch.setattr(_cpu_threads, "_cores", lambda: 2)
  monkeypatch.delenv("NPROC", raising=False)
  for users, reserved, devices, after in ((None, 16, 16, "32"), (None, None, 4, "16"),
                                          ("12", None, 16, "12"), ("64", None, 16, "64")):
    monkeypatch.setattr(_cpu_threads, "_reserved", reserved)
    if users is None and reserved is None:
      monkeypatch.delenv("PJRT_NPROC", raising=False)
    else:
      monkeypatch.setenv("PJRT_NPROC", users or str(reserved))
    ccf.experimental.reserve_cpu_threads(devices)
    assert os.environ["PJRT_NPROC"] == after, (users, reserved, devices)


def test_reserving_threads_once_the_backend_runs_warns_where_too_few():
  """The pool is sized: a late call changes nothing, and says so where the pool is too small."""
  jax.devices()  # the backend runs
  before = os.environ.get("PJRT_NPROC")
  with pytest.warns(RuntimeWarning, match="XLA:CPU runs 4099 devices on a pool of"):
    ccf.experimental.reserve_cpu_threads(4099)
  assert os.environ.get("PJRT_NPROC") == before
  for bad in (0, 2.5, "8"):
    with pytest.raises(ValueError, match="num_devices must be a positive int"):
      ccf.experimental.reserve_cpu_threads(bad)


def _train(dispatch: str, steps: int, wait_every_step: bool):
  """An Optax loop of the NNX layer on 8 devices; returns its final parameters as numpy."""
  with jax.set_mesh(ep_mesh(DEVICES)):
    layer = MoE(64, 128, 16, k=2, axis_name="ep", dispatch=dispatch, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(layer, optax.adamw(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(layer, optimizer, x):
      def loss(layer):
        y, aux = layer(x)
        return ((y - x) ** 2).mean() + 1e-2 * aux.load_balancing_loss
      value, grads = nnx.value_and_grad(loss)(layer)
      optimizer.update(layer, grads)
      return value

    # A step long enough that dispatch runs far ahead of execution.
    x = jax.random.normal(jax.random.key(1), (DEVICES, 32, 64))
    for _ in range(steps):
      value = step(layer, optimizer, x)
      if wait_every_step:
        value.block_until_ready()
    return jax.tree.map(np.asarray, nnx.state(layer, nnx.Param)), float(value)


@pytest.mark.slow
@pytest.mark.parametrize("dispatch", ["fused", "all_to_all"])
def test_training_loop_without_waiting_equals_waiting(dispatch):
  """200 steps dispatched back to back (the baseline's XLA collectives too: they stop after
  about 50 steps in flight when XLA:CPU has only one thread per device) end bitwise where the
  loop that waits on every step ends."""
  free, free_loss = _train(dispatch, 200, wait_every_step=False)
  waited, waited_loss = _train(dispatch, 200, wait_every_step=True)
  assert np.isfinite(free_loss) and free_loss == waited_loss
  jax.tree.map(np.testing.assert_array_equal, free, waited)


@pytest.mark.slow
def test_thousand_forward_calls_in_flight():
  x, ids, weights, w_in, w_out = make_inputs(Case(devices=DEVICES, tokens=16, seed=31))
  layer = sharded(ccf.fused_moe, DEVICES)
  step = jax.jit(lambda x: jnp.tanh(x + layer(x, ids, weights, w_in, w_out)))
  results = []
  for wait in (False, True):
    y = x
    for _ in range(1000):
      y = step(y)
      if wait:
        y.block_until_ready()
    results.append(np.asarray(y))
  assert np.abs(results[0]).max() > 0.1  # a live signal, not one that decayed to zero
  np.testing.assert_array_equal(results[0], results[1])


# Two devices, in a loop that waits on every step: reassign's psum feeds one fused_moe call; a
# second call and reference_moe's all_gathers are independent of it. Twelve programs (tile,
# threshold, a previous plan or not) alternate, and each step reads its results back, so the
# executor's threads pick up ready operations in varying orders.
_BESIDE_COLLECTIVES = textwrap.dedent("""
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np, jax.numpy as jnp, functools
    from jax.sharding import AxisType, PartitionSpec as P
    import jax_ccfuser as ccf
    D, T, H, F, E, K = 2, 12, 8, 8, 4, 2
    mesh = jax.make_mesh((D,), ("ep",), axis_types=(AxisType.Auto,), devices=jax.devices()[:D])

    @functools.lru_cache(None)
    def program(tile, threshold, kept):
      def body(x, ids, w, w_in, w_out, previous):
        plan = ccf.reassign(ids, E, axis_name="ep", tile=tile, threshold=threshold,
                            previous=previous if kept else None)
        planned = ccf.fused_moe(x, ids, w, w_in, w_out, axis_name="ep", plan=plan)
        plain = ccf.fused_moe(x, ids, w, w_in, w_out, axis_name="ep")
        want = ccf.reference_moe(x, ids, w, w_in, w_out, axis_name="ep")
        return planned, plain, want, jax.tree.map(lambda a: a[None], plan)
      return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 5 + (P(),),
                                   out_specs=P("ep")))

    rng = np.random.default_rng(0)
    w_in = jnp.asarray(rng.standard_normal((E, H, 2 * F)) / 3, jnp.float32)
    w_out = jnp.asarray(rng.standard_normal((E, F, H)) / 3, jnp.float32)
    none = ccf.Plan(*[jnp.zeros((1,))] * 6)
    previous = None
    for step in range(STEPS):
      tile, threshold = int(rng.choice([1, 4, 32])), float(rng.choice([1.0, 1.1]))
      kept = previous is not None and rng.random() < 0.5
      x = jnp.asarray(rng.standard_normal((D * T, H)), jnp.float32)
      hot = rng.integers(E)
      ids = jnp.asarray(np.where(rng.random((D * T, K)) < 0.6, hot,
                                 rng.integers(0, E, (D * T, K))), jnp.int32)
      w = jnp.asarray(rng.uniform(0.1, 1, (D * T, K)), jnp.float32)
      planned, plain, want, plan = program(tile, threshold, kept)(
          x, ids, w, w_in, w_out, previous if kept else none)
      previous = jax.tree.map(lambda a: a[0], plan)
      assert float(jnp.abs(planned - want).max()) < 1e-4, step
      assert float(jnp.abs(plain - want).max()) < 1e-4, step
    print("steps", STEPS)
""")


@pytest.mark.slow
def test_calls_beside_independent_collectives_never_deadlock():
  """A fused call and an XLA collective that do not depend on each other may run in either
  order on each device. A handler waiting for its peers on a thread of XLA's executor could
  wait there for a peer that waits in the collective, which the first device runs only after
  the handler (XLA aborts the process after 40 s, within the first few hundred steps of this
  loop): the handler waits on a thread of its own. Run apart, with a deadline, so a deadlock
  fails this test and not the suite."""
  steps = 1500
  # XLA's own compile flags (not the suite's): the interleavings that can deadlock come from its
  # optimised code's timing.
  env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "XLA_FLAGS")}
  done = subprocess.run([sys.executable, "-c", _BESIDE_COLLECTIVES.replace("STEPS", str(steps))],
                        capture_output=True, text=True, timeout=300, env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.split() == ["steps", str(steps)]


def test_queued_calls_fail_within_one_timeout_in_all():
  """Device 5 never makes the call: the first of 20 queued calls raises after the timeout, the
  rest within half a timeout more, each naming device 5."""
  case = Case(devices=DEVICES, tokens=8, seed=32)
  args = make_inputs(case)

  def body(x, ids, weights, w_in, w_out, axis_name):
    return jax.lax.cond(jax.lax.axis_index(axis_name) == 5, lambda: x,
                        lambda: ccf.fused_moe(x, ids, weights, w_in, w_out, axis_name=axis_name))

  with ccf.peer_timeout(1.0):
    f = jax.jit(sharded(body, DEVICES))
    f.lower(*args).compile()
    start = time.monotonic()
    results = [f(*args) for _ in range(20)]  # independent calls, queued back to back
    errors = []
    for y in results:
      with pytest.raises(jax.errors.JaxRuntimeError) as failure:
        y.block_until_ready()
      errors.append(str(failure.value))
    elapsed = time.monotonic() - start
  # XLA joins the devices' messages; every one names device 5 and only it.
  named = [re.findall(r"never arrived:((?: \d+)+)\.", e) for e in errors]
  assert all(n and set(n) == {" 5"} for n in named), named
  assert "waited 1000 ms" in errors[0]
  # 1.5 s for all (not 20 s): the rest is slack for a busy machine.
  assert elapsed < 5.0, elapsed


def _layer_fn(args):
  """The fused layer over 4 devices as a function of x, not jitted (eager shard_map)."""
  x, ids, weights, w_in, w_out = args
  layer = jax.shard_map(lambda *a: ccf.fused_moe(*a, axis_name="ep"), mesh=ep_mesh(4),
                        in_specs=P("ep"), out_specs=P("ep"))
  return lambda x: layer(x, ids, weights, w_in, w_out)


_FORWARD_MODE = {
    "jvp": lambda f, x: jax.jvp(f, (x,), (x,)),
    "jvp_of_jit": lambda f, x: jax.jvp(jax.jit(f), (x,), (x,)),
    "jit_of_jvp": lambda f, x: jax.jit(lambda x: jax.jvp(f, (x,), (x,)))(x),
    "linearize": lambda f, x: jax.linearize(f, x)[1](x),
    "jacfwd": lambda f, x: jax.jacfwd(lambda x: f(x).sum())(x),
    "hessian": lambda f, x: jax.hessian(lambda x: f(x).sum())(x),
    "hessian_of_jit": lambda f, x: jax.hessian(jax.jit(lambda x: f(x).sum()))(x),
    "grad_of_grad": lambda f, x: jax.grad(lambda x: jax.grad(lambda x: f(x).sum())(x).sum())(x),
    "grad_of_pullback": lambda f, x: jax.grad(lambda dy: jax.vjp(f, x)[1](dy)[0].sum())(x),
}


@pytest.mark.parametrize("transform", _FORWARD_MODE.values(), ids=_FORWARD_MODE.keys())
def test_forward_mode_says_what_works(transform):
  """Eager or through `jax.jit`, wherever JAX would run the tangent map forward or differentiate
  a custom call: the same TypeError, naming what works."""
  args = make_inputs(Case(devices=4, tokens=2, seed=33))
  with pytest.raises(TypeError, match=r"fused_moe supports reverse-mode differentiation only "
                                      r"\(jax.grad, jax.vjp"):
    transform(_layer_fn(args), args[0])


def test_reverse_mode_still_works():
  args = make_inputs(Case(devices=4, tokens=2, seed=33))
  expected = jax.grad(lambda x: sharded(ccf.reference_moe, 4)(x, *args[1:]).sum())(args[0])
  np.testing.assert_allclose(jax.grad(lambda x: _layer_fn(args)(x).sum())(args[0]), expected,
                             rtol=2e-4, atol=2e-5)
