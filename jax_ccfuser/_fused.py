"""`fused_moe`: the MoE layer as XLA FFI custom calls that read peers' memory directly.

Python -> `jax.ffi.ffi_call("ccf_moe_fwd" / "ccf_moe_bwd")` -> xla_ffi/ handlers -> kernels.
Across hosts, the rows travel between hosts by XLA collectives and each host runs the custom
calls over its own devices (`_across_hosts`).
"""

import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters.ad import JVPTracer  # what forward mode traces with; no public name
from jax.sharding import AxisType

from jax_ccfuser import _cpu_threads, _extension, _topology, _workspace
from jax_ccfuser._config import peer_timeout_ms
from jax_ccfuser._reassign import Plan, identity_workers
from jax_ccfuser._validation import check_gpu_tiles
from jax_ccfuser._validation import check_moe_args

# Each traced call gets its own pair of sites (forward, backward): the key under which the
# devices of one group find each other's buffers. Every device runs the same traced program,
# so they agree on it.
_sites = itertools.count(1)


class _Static(NamedTuple):
  """What a traced call fixes; hashable, so it can be a `custom_vjp` static argument."""
  site: int
  num_devices: int
  emulated: bool
  activation: str
  timeout_ms: int
  # Valid ids are [0, num_experts); a group computes the first num_devices * E_local of them
  # (a host of a call across hosts sees its own experts first) and skips the others.
  num_experts: int
  # Peers in other processes: every group's devices [G * D] and their platform; () when they
  # share this process.
  devices: tuple = ()
  platform: str = ""
  plan_slots: int = 1  # S of the plan's workers [E, S]: room for helpers in shared memory


class _CallAttrs(NamedTuple):
  """The custom calls' attributes, named as xla_ffi/moe_call.h's CCF_CALL_ATTRS names them."""
  site: int
  num_devices: int
  emulated: int
  activation: int
  timeout_ms: int
  num_experts: int
  workspace: int
  workspace_offset: int
  devices: tuple

  def as_ffi(self) -> dict:
    """`ffi_call`'s keyword attributes, typed as the native module declares them."""
    return {name: _typed(getattr(self, name), kind)
            for name, kind in _extension.CALL_ATTRIBUTES.items()}


def _typed(value, kind: str):
  if kind.endswith("[]"):
    return np.asarray(value, kind[:-2])
  return np.dtype(kind).type(value)


def _reserve_region(static: _Static, backward: bool, x, ids, weights, w_in, w_out):
  """The `(workspace chunk, offset)` of this call's region in the shared workspaces.

  Reserved while tracing, the first time a site's direction is traced; setting up a new chunk
  waits for the other processes of the host at key-value-store barriers. `(-1, 0)` when the
  peers share this process.
  """
  if not static.devices:
    return -1, 0
  t, k = ids.shape
  shape = dict(tokens=t, hidden=x.shape[1], k=k, slots=_slots(static, k),
               x_bytes=x.dtype.itemsize, weights_bytes=weights.dtype.itemsize, backward=backward)
  if static.platform == "cpu":
    nbytes = _extension.cpu.shared_region_bytes(
        **shape, experts_local=w_out.shape[0], expert_elements=w_in[0].size + w_out[0].size,
        w_bytes=w_in.dtype.itemsize, plan_slots=static.plan_slots)
  else:  # the CUDA handler refuses plans with helpers across processes
    nbytes = _extension.cuda.shared_region_bytes(**shape)
  return _workspace.region((static.site, backward), nbytes, static.timeout_ms, static.platform)


def _call_attrs(static: _Static, backward: bool, region) -> _CallAttrs:
  """The attributes of `static`'s forward or backward call, whose region `_reserve_region` gave."""
  workspace, offset = region
  return _CallAttrs(site=2 * static.site + backward, num_devices=static.num_devices,
                    emulated=int(static.emulated),
                    activation=_extension.ACTIVATION_CODES[static.activation],
                    timeout_ms=static.timeout_ms, num_experts=static.num_experts,
                    workspace=workspace, workspace_offset=offset,
                    devices=static.devices or (-1,))


def _slots(static: _Static, k: int) -> int:
  return min(k, static.num_devices)


def _varying_axes(a) -> frozenset:
  """The manual mesh axes `a` varies over (`.mat.varying` since JAX 0.10, `.vma` before)."""
  aval = jax.typeof(a)
  mat = getattr(aval, "mat", None)
  return frozenset(mat.varying if mat is not None else aval.vma)


def _varying_alike(*args):
  """`args` made varying over the union of their manual mesh axes (inside `shard_map`).

  Each device's custom call reads all its operands, so its results vary wherever any operand
  does; typing every operand and result alike keeps `shard_map`'s checks exact.
  """
  axes = frozenset().union(*(_varying_axes(a) for a in args))
  return tuple(jax.lax.pcast(a, tuple(axes - _varying_axes(a)), to="varying") for a in args)


def _result(like, shape, dtype):
  """A custom-call result type: `shape`/`dtype`, varying over the same axes as `like`."""
  return jax.typeof(like).update(shape=tuple(shape), dtype=jnp.dtype(dtype))


def _refuse_forward_mode(*operands):
  """Raises a TypeError naming what works if forward-mode autodiff traces `operands`.

  The backward pass is its own custom call (rows re-read from the peers, nothing kept), which
  JAX cannot run forward or differentiate again; left to JAX, jvp fails with messages that do
  not name the op (inside `shard_map`: "unhashable type: 'Unhashable'").
  """
  if any(isinstance(a, JVPTracer) for a in jax.tree.leaves(operands)):
    raise TypeError(
        "jax_ccfuser.fused_moe supports reverse-mode differentiation only (jax.grad, jax.vjp, "
        "jax.value_and_grad, jax.jacrev, once); forward mode (jax.jvp, jax.linearize, "
        "jax.jacfwd, jax.hessian) and differentiating its gradient again are not supported.")


def _forward_call(static, x, ids, weights, w_in, w_out, workers, bounds, rank, group):
  args = _varying_alike(x, ids, weights, w_in, w_out, workers, bounds, rank, group)
  t, h = x.shape
  call = jax.ffi.ffi_call(
      "ccf_moe_fwd",
      (_result(args[0], x.shape, x.dtype),
       _result(args[0], (t, _slots(static, ids.shape[1]), h), jnp.float32)),
      vmap_method="sequential")
  region = _reserve_region(static, False, x, ids, weights, w_in, w_out)
  y, _ = call(*args, **_call_attrs(static, False, region).as_ffi())
  return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_vjp(static, x, ids, weights, w_in, w_out, workers, bounds, rank, group):
  return _forward_call(static, x, ids, weights, w_in, w_out, workers, bounds, rank, group)


def _fused_fwd(static, *operands):
  _refuse_forward_mode(operands)
  # The residuals are the inputs themselves: no dispatched rows, activations or expert outputs
  # are kept; the backward call re-reads the rows from the peers and recomputes them.
  return _forward_call(static, *operands), operands


def _fused_bwd(static, residuals, dy):
  _refuse_forward_mode(residuals, dy)
  x, ids, weights, w_in, w_out, workers, bounds, rank, group = residuals
  if dy.shape != x.shape:
    raise ValueError(f"cotangent shape {dy.shape} != output shape {x.shape}")
  args = _varying_alike(x, ids, weights, w_in, w_out, workers, bounds, dy.astype(x.dtype), rank,
                        group)
  t, h = x.shape
  like = args[0]
  call = jax.ffi.ffi_call(
      "ccf_moe_bwd",
      (_result(like, x.shape, x.dtype), _result(like, weights.shape, weights.dtype),
       _result(like, w_in.shape, w_in.dtype), _result(like, w_out.shape, w_out.dtype),
       _result(like, (t, _slots(static, ids.shape[1]), h), jnp.float32)),
      vmap_method="sequential")
  region = _reserve_region(static, True, x, ids, weights, w_in, w_out)
  dx, dweights, dw_in, dw_out, _ = call(*args, **_call_attrs(static, True, region).as_ffi())
  int_zero = lambda a: np.zeros(a.shape, jax.dtypes.float0)
  return (dx, int_zero(ids), dweights, dw_in, dw_out, int_zero(workers), int_zero(bounds),
          int_zero(rank), int_zero(group))


_fused_vjp.defvjp(_fused_fwd, _fused_bwd)


def _fused(static, *operands):
  """The op every entry point calls: `_fused_vjp`, refused by name under forward mode."""
  _refuse_forward_mode(operands)
  return _fused_vjp(static, *operands)


def _position(axis_name):
  """This device's rank on `axis_name` and the index of its group over the other manual axes.

  Returns:
    Two int32 scalars.
  """
  if axis_name is None:
    return jnp.int32(0), jnp.int32(0)
  rank = jax.lax.axis_index(axis_name)
  ep_axes = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  mesh = jax.sharding.get_abstract_mesh()
  group = jnp.int32(0)
  for name, kind in zip(mesh.axis_names, mesh.axis_types):
    if kind == AxisType.Manual and name not in ep_axes:
      group = group * mesh.shape[name] + jax.lax.axis_index(name)
  return rank.astype(jnp.int32), group.astype(jnp.int32)


def _plan_operands(plan, num_experts, num_devices):
  """The plan's `(workers [E, S + 1], bounds [E, S + 2])`, or the trivial plan's."""
  if plan is None:
    return identity_workers(num_experts, num_devices)
  if not isinstance(plan, Plan):
    raise ValueError(f"plan must come from jax_ccfuser.reassign, got {type(plan).__name__}")
  if plan.workers.shape[0] != num_experts:
    raise ValueError(f"plan is for {plan.workers.shape[0]} experts, this call has {num_experts}")
  return plan.workers, plan.bounds


def fused_moe(x, expert_ids, expert_weights, w_in, w_out, *, axis_name=None,
              activation="swiglu", plan=None):
  """The MoE FFN with expert parallelism and no all-to-all.

  `y[t] = sum_k expert_weights[t, k] * FFN_{expert_ids[t, k]}(x[t])`. Inside `jax.shard_map`
  over `axis_name` (size D), each device computes the rows routed to its own experts by reading
  them straight out of the other devices' `x`, and each device sums the K contributions to its
  tokens in a fixed order (deterministic, dropless). Gradients flow to `x`, `expert_weights`,
  `w_in` and `w_out`; the backward pass keeps no dispatched rows (its residuals are the inputs:
  x `[T, H]`, the routing `[T, K]` and the weights) and re-reads the rows from the peers.

  Across processes (`jax.distributed`), trace it under `jax.set_mesh(mesh)`: devices of one
  host meet in shared-memory workspaces, hosts exchange rows through XLA collectives (see
  `jax_ccfuser.transport`).

  Args:
    x: `[T, H]` float32/bfloat16/float16, this device's tokens.
    expert_ids: `[T, K]` int32, global expert ids in `[0, D * E_local)`. An id outside that
      range raises an error naming the id and the device.
    expert_weights: `[T, K]`, x's dtype or float32: the combine weights.
    w_in: `[E_local, H, 2F]` for gated activations (gate half first), `[E_local, H, F]`
      otherwise; device d owns experts `d * E_local ... (d + 1) * E_local - 1`.
    w_out: `[E_local, F, H]`.
    axis_name: the expert-parallel mesh axis of the enclosing `shard_map`, or `None` when one
      device holds all experts.
    activation: "swiglu", "geglu", "gelu" (exact erf form), "relu" or "silu".
    plan: `None`, or a plan from `jax_ccfuser.reassign` for the same `expert_ids`.

  Returns:
    `[T, H]`, x's dtype.

  Examples:
    >>> def layer(x, ids, weights, w_in, w_out):
    ...   return jax_ccfuser.fused_moe(x, ids, weights, w_in, w_out, axis_name="ep")
    >>> y = jax.shard_map(layer, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))(
    ...     x, ids, weights, w_in, w_out)
  """
  dims = check_moe_args(x, expert_ids, expert_weights, w_in, w_out, activation=activation,
                        axis_name=axis_name)
  split = _topology.split(axis_name, dims.num_devices)
  if _topology.platform(split) == "gpu":
    check_gpu_tiles(dims, x.dtype)
  if dims.num_devices > 1 and jax.default_backend() == "cpu":
    _cpu_threads.check_pool(jax.local_device_count())
  workers, bounds = _plan_operands(plan, dims.num_experts, dims.num_devices)
  if split.num_hosts > 1:
    return _across_hosts(x, expert_ids, expert_weights, w_in, w_out, workers, bounds,
                         axis_name=axis_name, activation=activation, split=split)
  static = _Static(site=next(_sites), num_devices=dims.num_devices, emulated=False,
                   activation=activation, timeout_ms=peer_timeout_ms(),
                   num_experts=dims.num_experts, devices=split.devices,
                   platform=split.platform, plan_slots=workers.shape[1])
  rank, group = _position(axis_name)
  return _fused(static, x, expert_ids, expert_weights, w_in, w_out, workers, bounds, rank, group)


def _across_hosts(x, expert_ids, expert_weights, w_in, w_out, workers, bounds, *, axis_name,
                  activation, split):
  """`fused_moe` over several hosts: collectives between hosts, shared memory within each.

  Every token goes to every host of its group once (an `all_gather` over the devices with the
  same rank in each host's block: with static shapes that is the worst case of a dropless
  dispatch, and far less than the `[D, T*K]` of a dropless `all_to_all`). Each host runs the
  custom calls over its own devices for the pairs of its own experts, and an `all_to_all`
  hands each token's per-host partial sums back, summed in host order. A reassignment plan
  (`reassign` keeps helpers on their expert's host) runs as each host's part of it: a slot's
  rows are then counted in the host's own order, which splits them differently but as evenly.
  """
  n, per_host = split.num_hosts, split.per_host
  t, h = x.shape
  here = per_host * w_out.shape[0]  # experts per host
  num_experts = n * here
  same_place = [[b * per_host + r for b in range(n)] for r in range(per_host)]
  gather = lambda a: jax.lax.all_gather(a, axis_name, axis_index_groups=same_place).reshape(
      (n * t,) + a.shape[1:])
  rank, group = _position(axis_name)
  block = rank // per_host
  ids = gather(expert_ids)
  # Rotate so this host's experts come first; out-of-range ids stay as they are, to be reported.
  valid = (ids >= 0) & (ids < num_experts)
  ids = jnp.where(valid, (ids - block * here) % num_experts, ids)
  workers = jax.lax.dynamic_slice_in_dim(workers, block * here, here)
  workers = jnp.where(workers >= 0, workers - block * per_host, -1)
  bounds = jax.lax.dynamic_slice_in_dim(bounds, block * here, here)
  static = _Static(site=next(_sites), num_devices=per_host, emulated=False,
                   activation=activation, timeout_ms=peer_timeout_ms(),
                   num_experts=num_experts, devices=split.devices, platform=split.platform,
                   plan_slots=workers.shape[1])
  partial = _fused(static, gather(x), ids, gather(expert_weights), w_in, w_out, workers, bounds,
                   rank % per_host, group * n + block)
  back = jax.lax.all_to_all(partial.reshape(n, t, h), axis_name, 0, 0,
                            axis_index_groups=same_place)
  return jnp.sum(back.astype(jnp.float32), axis=0).astype(x.dtype)


def fused_moe_emulated(x, expert_ids, expert_weights, w_in, w_out, *, num_devices: int,
                       activation="swiglu", plan=None):
  """`fused_moe` for `num_devices` emulated peers whose buffers all live on one device.

  The operands stack the D devices' blocks along their leading axis, as the global arrays of
  a `shard_map` over D devices would: x `[D*T, H]`, expert_ids/expert_weights `[D*T, K]`, w_in
  `[D*E_local, H, G*F]`, w_out `[D*E_local, F, H]`. The same handler and kernels run, with the
  peer table pointing into these blocks, so the remote-read path is exercised (and timed) on a
  single device. Results equal `fused_moe` over D real devices.
  """
  if x.shape[0] % num_devices or w_out.shape[0] % num_devices:
    raise ValueError(f"x rows {x.shape[0]} and experts {w_out.shape[0]} must split evenly over "
                     f"{num_devices} emulated devices")
  dims = check_moe_args(x, expert_ids, expert_weights, w_in, w_out, activation=activation,
                        axis_name=None)
  if _topology.platform() == "gpu":
    check_gpu_tiles(dims, x.dtype)
  workers, bounds = _plan_operands(plan, w_out.shape[0], num_devices)
  static = _Static(site=next(_sites), num_devices=num_devices, emulated=True,
                   activation=activation, timeout_ms=peer_timeout_ms(),
                   num_experts=w_out.shape[0])
  return _fused(static, x, expert_ids, expert_weights, w_in, w_out, workers, bounds,
                jnp.int32(0), jnp.int32(0))
