"""One process of a multi-process fused_moe run (tests/test_distributed.py starts several).

    python tests/distributed_worker.py PROCESS NUM_PROCESSES PORT DEVICES SCENARIO

Each process has DEVICES simulated CPU devices; together they form one expert-parallel axis.
`JAX_CCFUSER_HOST` (set by the test) says which processes share a host. Prints one JSON line:
  check: the largest error of fused_moe against reference_moe (forward and every gradient)
    relative to the dtype's tolerance (<= 1 passes; scaled, as the suite's, by a quarter of an
    output's largest value where that is above 1: a gradient sums many rows), the collectives
    and shared-memory workspaces the compiled program uses, the same check with a reassignment
    plan on skewed routing (and its frozen experts' dx and d expert_weights bitwise the full
    backward's, none of their weight gradients asked for), across hosts the same with hot
    experts replicated onto the other hosts (routing skewed onto host 0's experts), and the
    errors of a call traced without the mesh set and of an out-of-range expert id;
  check_bf16: the check and the check with a plan, in bfloat16;
  check_only: the check alone;
  trace_order, trace_transport: after a call together, process 0 traces another call (or the
    same), then the last process traces the first again (under transport("collectives")): the
    error of each trace;
  crash: the last process reports its pid and dies before the second call; the others report
    the error they get, and that of a third call;
  raise: the same, but the last process raises an uncaught exception instead of dying, and the
    calls' peer timeout is 60 s;
  fail_fast: the last process's devices skip one call and come back a moment later, then stop
    calling while the others queue 10 calls (a short peer timeout): their errors and times;
  silent: after a call together, the last process stops calling but stays alive while the
    others make another call: their error and its time;
  slow_peer: every row goes to the last device's experts, whose compute outlasts the 0.2 s peer
    timeout: 3 calls' errors, whether their results are bitwise those under a long timeout, and
    how long a call takes under that;
  gave_up_in_set_up: after a call together, process 0 traces a call that grows the workspaces
    with a 2 s peer timeout and gives up; the last process traces it 6 s later: its error;
  killed_in_set_up: after a call together, a call of more tokens grows the workspaces by a
    chunk; the last process dies 3 s after tracing it (having made its part), the others trace
    it 8 s in: their error, its time, and the names of the dead process left in /dev/shm;
  train: the demo LM (models/) takes a few Optax steps with dispatch "fused" and "all_to_all"
    from the same initialization; both loss curves;
  train_replicas: the same with hot experts replicated across hosts (routers skewed onto host
    0's experts); also the rows per host without and with the plans.
"""

import dataclasses
import functools
import json
import os
import sys
import threading
import time

import jax

PROCESS, NUM_PROCESSES, PORT, DEVICES = map(int, sys.argv[1:5])
SCENARIO = sys.argv[5]
jax.config.update("jax_num_cpu_devices", DEVICES)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{PORT}", num_processes=NUM_PROCESSES, process_id=PROCESS)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import jax_ccfuser as ccf  # noqa: E402
from jax_ccfuser._topology import host_names, key_value_client  # noqa: E402
from moe_cases import TOLERANCES, Case, backward_weight_grads, make_inputs  # noqa: E402


def global_array(mesh, a):
  a = np.asarray(a)
  return jax.make_array_from_callback(a.shape, NamedSharding(mesh, P("ep")), lambda i: a[i])


def loss_and_grads(moe, mesh, case, argnums=(0, 1, 2, 3)):
  def loss(x, weights, w_in, w_out, ids, cotangent):
    y = jax.shard_map(lambda *a: moe(*a, axis_name="ep", activation=case.activation),
                      mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))(x, ids, weights, w_in, w_out)
    return jnp.sum(y.astype(jnp.float32) * cotangent), y
  return jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))


@functools.partial(jax.jit, static_argnums=6)
@functools.partial(jax.value_and_grad, argnums=(0, 1, 2, 3), has_aux=True)
def reference_loss_and_grads(x, weights, w_in, w_out, ids, cotangent, activation):
  y = ccf.reference_moe(x, ids, weights, w_in, w_out, activation=activation)
  return jnp.sum(y.astype(jnp.float32) * cotangent), y


def check(mesh, case, moe=ccf.fused_moe, ids=None, frozen=False):
  """With `frozen`, also whether the step of frozen experts (gradients of x and expert_weights
  only) asks its backward for no weight gradients and gets that pair bitwise."""
  x, case_ids, weights, w_in, w_out = make_inputs(case)
  ids = case_ids if ids is None else ids
  cot = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
  args = [global_array(mesh, a) for a in (x, weights, w_in, w_out, ids, cot)]
  step = loss_and_grads(moe, mesh, case).lower(*args).compile()
  hlo = step.as_text()
  (_, y), grads = step(*args)
  fused = [multihost_utils.process_allgather(a, tiled=True) for a in (y, *grads)]
  (_, y_ref), grads_ref = reference_loss_and_grads(x, weights, w_in, w_out, ids, cot,
                                                   case.activation)
  rtol, atol = TOLERANCES[case.dtype]
  worst = 0.0
  for got, want in zip(fused, (y_ref, *grads_ref)):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = max(1.0, float(np.abs(want).max()) / 4)
    worst = max(worst, float(np.max(np.abs(got - want) / (scale * (atol + rtol * np.abs(want))))))
  out = dict(worst=worst, all_gather=hlo.count("all-gather"), all_to_all=hlo.count("all-to-all"),
             shared="workspace = 0" in hlo)
  if frozen:
    lowered = loss_and_grads(moe, mesh, case, argnums=(0, 1)).lower(*args)
    _, frozen_grads = lowered.compile()(*args)
    out["frozen"] = dict(weight_grads=backward_weight_grads(lowered.as_text()), bitwise=all(
        np.array_equal(multihost_utils.process_allgather(a, tiled=True), b)
        for a, b in zip(frozen_grads, fused[1:3])))
  return out


def error_of(fn, *args):
  try:
    jax.block_until_ready(fn(*args))
  except Exception as e:  # noqa: BLE001  (reported to the test)
    return f"{type(e).__name__}: {e}"
  return None


def layer(mesh, **kwargs):
  body = lambda x, ids, weights, w_in, w_out: ccf.fused_moe(x, ids, weights, w_in, w_out,
                                                            axis_name="ep", **kwargs)
  return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))


def with_plan(mesh, case):
  """fused_moe with a reassignment plan on skewed routing: its check, and the busiest device's
  rows over the mean without and with the plan."""
  plan = lambda ids: ccf.reassign(ids, case.num_experts, axis_name="ep", tile=1, max_helpers=3)
  moe = lambda x, ids, *rest, **kw: ccf.fused_moe(x, ids, *rest, plan=plan(ids), **kw)
  loads = jax.jit(jax.shard_map(lambda ids: jnp.stack(ccf.plan_loads(plan(ids))), mesh=mesh,
                                in_specs=P("ep"), out_specs=P("ep")))
  before, after = multihost_utils.process_allgather(
      loads(global_array(mesh, make_inputs(case)[1])), tiled=True)[:2]
  return dict(imbalance=[float(v.max() / v.mean()) for v in (before, after)],
              **{k: v for k, v in check(mesh, case, moe, frozen=True).items()
                 if k in ("worst", "frozen")})


def host_hot_ids(case, num_hosts):
  """Routing skewed onto host 0's experts: 90% of the pairs pick one of them."""
  host_experts = case.num_experts // num_hosts
  p = np.full(case.num_experts, 0.1 / (case.num_experts - host_experts))
  p[:host_experts] = 0.9 / host_experts
  rng = np.random.default_rng(7)
  return rng.choice(case.num_experts, (case.devices * case.tokens, case.k), p=p).astype(np.int32)


def replicated(mesh, case, num_hosts):
  """Hot experts replicated across hosts (`reassign(..., replicas=R)`) on routing skewed onto
  host 0's experts: the checks with and without the plan, the rows per host without and with
  it, and the experts exported."""
  ids = host_hot_ids(case, num_hosts)
  out = {}
  for replicas in (1, 2):
    plan = lambda ids: ccf.reassign(ids, case.num_experts, axis_name="ep", tile=1,
                                    replicas=replicas)
    moe = lambda x, ids, *rest, **kw: ccf.fused_moe(x, ids, *rest, plan=plan(ids), **kw)
    report = jax.jit(jax.shard_map(
        lambda ids: jnp.concatenate([jnp.stack(ccf.plan_loads(plan(ids))),
                                     jnp.sum(plan(ids).replication.experts >= 0)[None, None]
                                     * jnp.ones((1, case.devices), jnp.int32)]),
        mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
    before, after, exported = multihost_utils.process_allgather(
        report(global_array(mesh, ids)), tiled=True)[:3]
    out[replicas] = dict(
        host_rows=[np.asarray(v).reshape(num_hosts, -1).sum(1).tolist() for v in (before, after)],
        exported=int(exported[0]), worst=check(mesh, case, moe, ids)["worst"])
  out["plain_worst"] = check(mesh, case, ids=ids)["worst"]
  return out


def bad_id(mesh, case):
  """The error of a call with an out-of-range expert id."""
  inputs = make_inputs(case)
  bad = np.asarray(inputs[1]).copy()
  bad[3, 1] = case.num_experts + 5
  args = [global_array(mesh, a) for a in (inputs[0], bad, *inputs[2:])]
  return error_of(layer(mesh), *args)


def train_both(num_hosts=1, replicas=0):
  """The demo LM's Optax loop with dispatch "fused" and "all_to_all" from one initialization:
  each one's losses; with `replicas`, the fused layers replicate hot experts across hosts and
  every router's expert bias starts skewed onto host 0's experts (the same for both)."""
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from flax import nnx
  from jax_ccfuser.nnx import ExpertBias
  from models.moe_lm import LMConfig, MoeLM
  from models.train import TrainConfig, batch_placer, make_optimizer, train
  data = np.random.default_rng(0).integers(0, 256, size=1 << 14, dtype=np.uint8)
  mesh = jax.make_mesh((jax.device_count(),), ("expert",), axis_types=(AxisType.Auto,))
  num_experts = 2 * jax.device_count()
  skew = np.where(np.arange(num_experts) < num_experts // num_hosts, 2.0, 0.0)
  out = {}
  for dispatch in ("fused", "all_to_all"):
    fused = dispatch == "fused"
    config = LMConfig(seq_len=32, hidden=32, heads=2, layers=2, ffn=48,
                      num_experts=num_experts, k=2, dispatch=dispatch,
                      reassign=fused and replicas > 0, replicas=replicas if fused else 0,
                      expert_bias=replicas > 0)
    train_config = TrainConfig(batch=jax.device_count(), total_steps=3, warmup_steps=1)
    with jax.set_mesh(mesh):
      model = MoeLM(config, rngs=nnx.Rngs(0))
      if replicas:
        biases = nnx.state(model, ExpertBias)
        nnx.update(model, jax.tree.map(lambda b: b + jnp.asarray(skew, b.dtype), biases))
      history = train(model, make_optimizer(model, train_config), data, train_config, steps=3,
                      place=batch_placer(mesh, config.axis_name))
    out[dispatch] = [r["loss"] for r in history]
    if fused:  # the fused handlers ran on this process's devices
      out["fused_calls"] = len(ccf.peer_traffic())
      # Rows per host without and with the plans, every step and layer: [steps, L, 2, hosts].
      out["host_rows"] = np.asarray([r["device_loads"] for r in history]).reshape(
          len(history), config.layers, 2, num_hosts, -1).sum(-1).tolist()
  return out


def local(y):
  return [np.asarray(s.data).tolist() for s in y.addressable_shards]


def timed_error(fn, *args):
  start = time.monotonic()
  return error_of(fn, *args), time.monotonic() - start


def skipping_step(mesh):
  """The layer, jitted, whose devices of process `skip` (an operand; -1: none) skip the call."""
  def body(x, ids, weights, w_in, w_out, skip):
    skipping = jax.lax.axis_index("ep") // DEVICES == skip
    return jax.lax.cond(skipping, lambda: x, lambda: ccf.fused_moe(x, ids, weights, w_in, w_out,
                                                                   axis_name="ep"))
  return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 5 + (P(),),
                               out_specs=P("ep")))


def queue(step, *args, calls=10):
  """`calls` calls of `step` dispatched at once: each one's error, and the seconds they took."""
  start = time.monotonic()
  queued = [step(*args) for _ in range(calls)]
  return [error_of(lambda y=y: y) for y in queued], time.monotonic() - start


def fail_fast(mesh, case):
  """The fail_fast scenario: a peer process that skips a call is waited for, one that stops
  calling fails the calls queued behind the first timeout within about 1.5 timeouts."""
  args = [global_array(mesh, a) for a in make_inputs(case)]
  last, everyone = np.int32(NUM_PROCESSES - 1), np.int32(-1)
  client = key_value_client()
  out = {}
  with ccf.peer_timeout(1.0):
    step = skipping_step(mesh)
    first = local(step(*args, everyone))
    out["skipped"], out["skipped_s"] = timed_error(step, *args, last)
    client.wait_at_barrier("fail_fast/skipped", 60_000)
    if PROCESS == NUM_PROCESSES - 1:
      time.sleep(0.2)  # back a moment later: within half a timeout of the others' timeout
    again = step(*args, everyone)
    out["again_equal"] = local(again) == first
    # Every device is done with that call before the queue starts: a peer still leaving its
    # last barrier when a queued call begins to wait has been heard from, so is not yet gone.
    client.wait_at_barrier("fail_fast/again", 60_000)
    if PROCESS != NUM_PROCESSES - 1:
      out["queued"], out["queued_s"] = queue(step, *args, everyone)
    client.wait_at_barrier("fail_fast/queued", 120_000)  # the last process waits here, silent
  return out


def withdrawn(mesh, case):
  """The withdrawn scenario: the last process calls alone, gives up waiting (withdrawing from
  the barrier) and falls silent; the others' queued calls at that barrier then fail within
  about 1.5 timeouts, as behind a process that never came."""
  args = [global_array(mesh, a) for a in make_inputs(case)]
  client = key_value_client()
  out = {}
  with ccf.peer_timeout(1.0):
    step = skipping_step(mesh)
    jax.block_until_ready(step(*args, np.int32(-1)))
    client.wait_at_barrier("withdrawn/ready", 60_000)
    if PROCESS == NUM_PROCESSES - 1:
      out["alone"] = error_of(step, *args, np.int32(-1))
    client.wait_at_barrier("withdrawn/alone", 60_000)
    if PROCESS != NUM_PROCESSES - 1:
      out["queued"], out["queued_s"] = queue(step, *args, np.int32(-1))
    client.wait_at_barrier("withdrawn/queued", 120_000)  # the last process waits here, silent
  return out


def silent(mesh, case):
  """The silent scenario: after a call together the last process stops calling but stays alive
  (at a key-value barrier) while the others make one more call: its error and seconds. Each
  call is compiled before the processes meet, so the first runs together however loaded the
  machine (the collectives' timeout, which the test sets short, counts from each one's start)."""
  args = [global_array(mesh, a) for a in make_inputs(case)]
  client = key_value_client()
  out = {}
  call = layer(mesh).lower(*args).compile()
  client.wait_at_barrier("silent/compiled", 120_000)
  jax.block_until_ready(call(*args))
  if PROCESS != NUM_PROCESSES - 1:
    out["error"], out["waited_s"] = timed_error(call, *args)
  client.wait_at_barrier("silent/done", 120_000)  # the last process waits here, silent
  return out


def slow_peer(mesh, case):
  """The slow_peer scenario (see the module docstring)."""
  big = dataclasses.replace(case, tokens=128, hidden=768, ffn=1536, k=8)
  x, ids, weights, w_in, w_out = make_inputs(big)
  last = NUM_PROCESSES * DEVICES - 1
  ids = last * big.experts_local + ids % big.experts_local  # the last device's experts only
  args = [global_array(mesh, a) for a in (x, ids, weights, w_in, w_out)]
  call = layer(mesh)
  client = key_value_client()
  with ccf.peer_timeout(60.0):
    want = local(call(*args))
    client.wait_at_barrier("slow_peer/long", 60_000)
    out = dict(errors=[], equal=[], long_s=timed_error(call, *args)[1])
  with ccf.peer_timeout(0.2):
    call.lower(*args).compile()
    for i in range(3):
      client.wait_at_barrier(f"slow_peer/{i}", 60_000)  # the calls start together
      y = call(*args)
      error = error_of(lambda: y)
      out["errors"].append(error)
      out["equal"].append(error is None and local(y) == want)
  return out


def late_first_trace(mesh, case):
  """The late scenario: the last process traces its first call 2 s after the others, whose
  first trace gives up after a 1 s peer timeout with the error it got. Their next trace waits up
  to a minute, so it meets the late process however loaded the machine (a second 1 s window
  once missed it), and runs, and so do the check of forward and gradients after it and a layer
  of another activation. The hosts are known before (as after a reassign traced earlier), so
  the first trace gives up while the job is set up."""
  args = [global_array(mesh, a) for a in make_inputs(case)]
  out = {}
  call = layer(mesh)
  host_names()
  key_value_client().wait_at_barrier("late/start", 60_000)  # late from one moment on
  if PROCESS == NUM_PROCESSES - 1:
    time.sleep(2.0)
  else:
    with ccf.peer_timeout(1.0):
      out["first"] = error_of(call, *args)
  with ccf.peer_timeout(60.0):
    out["second"] = error_of(call, *args)
  out.update(check(mesh, case))
  out["other"] = error_of(layer(mesh, activation="geglu"), *args)
  return out


def trace_order(mesh, case, forced=None):
  """The trace_order scenario: after a call together, process 0 traces a layer of another
  activation (as a process that alone dumps a cost analysis would), then the last process
  traces another layer. With `forced` (trace_transport), process 0 traces the same layer as the
  last process, which traces it under `jax_ccfuser.transport(forced)`."""
  args = [global_array(mesh, a) for a in make_inputs(case)]
  client = key_value_client()
  out = {"error": None}
  with ccf.peer_timeout(10.0):
    jax.block_until_ready(layer(mesh)(*args))
    if PROCESS == 0:
      activation = "swiglu" if forced else "geglu"
      out["error"] = error_of(lambda: layer(mesh, activation=activation).lower(*args))
    client.wait_at_barrier("trace_order/first", 60_000)
    if PROCESS == NUM_PROCESSES - 1:
      with ccf.transport(forced or "auto"):
        out["error"] = error_of(lambda: layer(mesh).lower(*args))
  return out


def gave_up_in_set_up(mesh, case):
  """The gave_up_in_set_up scenario (see the module docstring)."""
  jax.block_until_ready(layer(mesh)(*(global_array(mesh, a) for a in make_inputs(case))))
  bigger = [global_array(mesh, a)
            for a in make_inputs(dataclasses.replace(case, tokens=2048, hidden=256))]
  if PROCESS == 0:
    with ccf.peer_timeout(2.0):
      error = error_of(lambda: layer(mesh).lower(*bigger))
  else:
    time.sleep(6.0)
    with ccf.peer_timeout(60.0):
      error = error_of(lambda: layer(mesh).lower(*bigger))
  key_value_client().wait_at_barrier("gave_up/done", 120_000)  # process 0 holds the store
  return dict(error=error)


def killed_in_set_up(mesh, case):
  """The killed_in_set_up scenario (see the module docstring)."""
  jax.block_until_ready(layer(mesh)(*(global_array(mesh, a) for a in make_inputs(case))))
  bigger = [global_array(mesh, a)
            for a in make_inputs(dataclasses.replace(case, tokens=2048, hidden=256))]
  if PROCESS == NUM_PROCESSES - 1:
    print(json.dumps(dict(process=PROCESS, pid=os.getpid())), flush=True)
    threading.Timer(3.0, lambda: os._exit(17)).start()
    layer(mesh).lower(*bigger)
    time.sleep(60)  # the timer ends it
  time.sleep(8.0)
  with ccf.peer_timeout(60.0):
    error, waited = timed_error(lambda: layer(mesh).lower(*bigger))
  return dict(error=error, waited_s=waited)


def main():
  mesh = jax.make_mesh((NUM_PROCESSES * DEVICES,), ("ep",))
  case = Case(devices=NUM_PROCESSES * DEVICES, tokens=9, hidden=16, ffn=24, experts_local=2, k=2,
              dtype=jnp.bfloat16 if SCENARIO.endswith("bf16") else jnp.float32, seed=PROCESS * 0)
  out = dict(process=PROCESS, pid=os.getpid())
  if SCENARIO == "train":
    out["losses"] = train_both()
  if SCENARIO == "train_replicas":
    out["losses"] = train_both(len(set(host_names())), replicas=1)
  if SCENARIO == "check":
    # Traced without jax.set_mesh: fused_moe cannot tell where the devices live.
    out["no_mesh"] = error_of(layer(mesh), *(global_array(mesh, a) for a in make_inputs(case)))
  with jax.set_mesh(mesh):
    if SCENARIO.startswith("check"):
      out.update(check(mesh, case))
      if SCENARIO != "check_only":
        out["plan"] = with_plan(mesh, dataclasses.replace(case, skew=0.9))
      num_hosts = len(set(host_names()))
      if SCENARIO == "check" and num_hosts > 1:
        out["replicated"] = replicated(mesh, case, num_hosts)
      if SCENARIO == "check":
        out["bad_id"] = bad_id(mesh, case)  # last: the failed call is not rerun
    elif SCENARIO == "fail_fast":
      out.update(fail_fast(mesh, case))
    elif SCENARIO == "withdrawn":
      out.update(withdrawn(mesh, case))
    elif SCENARIO == "silent":
      out.update(silent(mesh, case))
    elif SCENARIO == "slow_peer":
      out.update(slow_peer(mesh, case))
    elif SCENARIO == "late":
      out.update(late_first_trace(mesh, case))
    elif SCENARIO == "trace_order":
      out.update(trace_order(mesh, case))
    elif SCENARIO == "trace_transport":
      out.update(trace_order(mesh, case, forced="collectives"))
    elif SCENARIO == "gave_up_in_set_up":
      out.update(gave_up_in_set_up(mesh, case))
    elif SCENARIO == "killed_in_set_up":
      out.update(killed_in_set_up(mesh, case))
      print(json.dumps(out), flush=True)
      os._exit(0)  # the coordination service would wait for the dead process at shutdown
    elif SCENARIO in ("crash", "raise"):
      args = [global_array(mesh, a) for a in make_inputs(case)]
      with ccf.peer_timeout(3.0 if SCENARIO == "crash" else 60.0):
        call = layer(mesh)
        jax.block_until_ready(call(*args))
      if PROCESS == NUM_PROCESSES - 1:
        print(json.dumps(out), flush=True)  # its pid, for the others' errors to name
        if SCENARIO == "crash":
          os._exit(17)  # dies without another word, as a crashed process does
        raise RuntimeError("the step failed")  # lives on in jax.distributed's shutdown
      out["error"], out["waited_s"] = timed_error(call, *args)
      out["again"], out["again_s"] = timed_error(call, *args)
      print(json.dumps(out), flush=True)
      os._exit(0)  # the coordination service would wait for the dead process at shutdown
  print(json.dumps(out), flush=True)


main()
