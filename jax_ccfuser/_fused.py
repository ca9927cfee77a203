"""`fused_moe`: the MoE layer as XLA FFI custom calls that read peers' memory directly.

Python -> `jax.ffi.ffi_call("ccf_moe_fwd" / "ccf_moe_bwd")` -> xla_ffi/ handlers -> kernels.
Across hosts, the rows travel between hosts by XLA collectives and each host runs the custom
calls over its own devices (`_across_hosts`).
"""

import functools
import itertools
import math
from typing import NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.interpreters import ad, batching, mlir
from jax.sharding import AxisType

from jax_ccfuser import _cpu_threads, _extension, _topology, _workspace
from jax_ccfuser._broadcasting import numpy_broadcasting
from jax_ccfuser._expert_order import rank_within_expert
from jax_ccfuser._ffn import no_tokens
from jax_ccfuser._jax_internals import varying_axes
from jax_ccfuser._config import (fetch_sms_in_force, peer_timeout_ms, residual_budget_bytes,
                                 scratch_budget_bytes, tf32_in_force)
from jax_ccfuser._reassign import Plan, identity_workers
from jax_ccfuser._validation import check_count
from jax_ccfuser._validation import check_gpu_group
from jax_ccfuser._validation import check_gpu_limits
from jax_ccfuser._validation import Operand, check_moe_args

# Each traced call gets its own pair of sites (forward, backward): the key under which the
# devices of one group find each other's buffers. Every device runs the same traced program,
# so they agree on it.
_sites = itertools.count(1)

# What the backward starts from (`residuals=`): the inputs, recomputing each row's hidden
# activation h = x @ w_in (lean), or the inputs and h kept from the forward (fewer FLOPs); "auto"
# keeps h when it fits `jax_ccfuser.residual_budget`.
RESIDUALS = ("inputs", "hidden", "auto")


class _Static(NamedTuple):
  """What a traced call fixes; hashable, so it can be a `custom_jvp` static argument and a
  primitive parameter."""
  site: int
  num_devices: int
  emulated: bool
  activation: str
  timeout_ms: int
  # Valid ids are [0, num_experts); a group computes the first num_devices * E_local of them
  # (a host of a call across hosts sees its own experts first) and skips the others.
  num_experts: int
  # Peers in other processes: every group's devices [G * D]; () when they share this process.
  devices: tuple = ()
  platform: str = ""  # the platform the call is traced for ("cpu", "gpu")
  plan_slots: int = 1  # S + 1 of the plan's workers [E, S + 1]: room for helpers in shared memory
  kept_rows: int = 0  # C: rows of h each device keeps for the backward; 0 recomputes them all
  scratch_budget: int = 0  # bytes of GPU scratch per call (jax_ccfuser.scratch_budget)
  fetch_sms: int = 0  # SMs the GEMMs leave to the fetch (jax_ccfuser.fetch_sms; -1: auto)
  tf32: bool = False  # float32 GEMMs may run as TF32 (jax.default_matmul_precision)


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
  scratch_budget: int
  fetch_sms: int
  tf32: int
  kept_rows: int
  weight_grads: int

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
  else:  # no plan with helpers across processes on GPU (check_gpu_group)
    nbytes = _extension.cuda.shared_region_bytes(**shape)
  where = f"{static.num_devices} devices {list(static.devices)}, {static.num_experts} experts"
  call = _describe("backward" if backward else "forward", static.activation, where,
                   static.plan_slots, x, ids, weights, w_in, w_out)
  return _workspace.region((static.site, backward), nbytes, static.timeout_ms, static.platform,
                           call)


def _describe(direction: str, activation: str, where: str, plan_slots: int, x, ids, weights,
              w_in, w_out) -> str:
  """What a call is, for the processes to compare while they trace it (`_workspace`)."""
  return (f"{direction} of {activation} over {where}, {plan_slots} plan slots, "
          f"x {x.dtype}{list(x.shape)}, ids {list(ids.shape)}, weights {weights.dtype}, "
          f"w_in {list(w_in.shape)}, w_out {list(w_out.shape)}")


def _call_attrs(static: _Static, backward: bool, region, kept_rows: int,
                weight_grads: bool = False) -> _CallAttrs:
  """The attributes of `static`'s forward or backward call, whose region `_reserve_region` gave,
  with `kept_rows` h rows kept per device (and for a backward, whether it computes the weight
  gradients)."""
  workspace, offset = region
  return _CallAttrs(site=2 * static.site + backward, num_devices=static.num_devices,
                    emulated=int(static.emulated),
                    activation=_extension.ACTIVATION_CODES[static.activation],
                    timeout_ms=static.timeout_ms, num_experts=static.num_experts,
                    workspace=workspace, workspace_offset=offset,
                    devices=static.devices or (-1,), scratch_budget=static.scratch_budget,
                    fetch_sms=static.fetch_sms, tf32=int(static.tf32), kept_rows=kept_rows,
                    weight_grads=int(weight_grads))


def _staging_shape(static: _Static, region, x, ids) -> tuple:
  """The calls' `staging` result: `[T, S, H]` float32, where the peers add this device's rows,
  or `[1, 1, 1]` where they add them in its region of the shared workspaces instead."""
  return (x.shape[0], _slots(static, ids.shape[1]), x.shape[1]) if region[0] < 0 else (1, 1, 1)


def _hidden_shape(static: _Static, kept_rows: int, gate_ffn: int) -> tuple:
  """The calls' `hidden` `[R, G*F]`: the `kept_rows` of every device the call stands for, or one
  row that holds nothing where none are kept. Never zero-sized: XLA (jax 0.11) crashes compiling
  a zero-sized custom-call operand or shard_map residual under shard_map."""
  return (kept_rows * (static.num_devices if static.emulated else 1) or 1, gate_ffn)


def _traced_settings() -> dict:
  """The `_Static` fields that `jax_ccfuser`'s settings in force now fix into a call traced now."""
  fetch = fetch_sms_in_force()
  if fetch >= 0 and _topology.platform() == "gpu":
    sms = getattr(jax.local_devices()[0], "core_count", None)
    if sms is not None and fetch >= sms:
      raise ValueError(f"jax_ccfuser.fetch_sms({fetch}) leaves none of this GPU's {sms} SMs to "
                       f"the GEMMs")
  return dict(timeout_ms=peer_timeout_ms(), scratch_budget=scratch_budget_bytes(),
              fetch_sms=fetch, tf32=tf32_in_force())


def _slots(static: _Static, k: int) -> int:
  return min(k, static.num_devices)


def _varying_alike(*args):
  """`args` made varying over the union of their manual mesh axes (inside `shard_map`).

  Each device's custom call reads all its operands, so its results vary wherever any operand
  does; typing every operand and result alike keeps `shard_map`'s checks exact.
  """
  axes = frozenset().union(*(varying_axes(a) for a in args))
  return tuple(jax.lax.pcast(a, tuple(axes - varying_axes(a)), to="varying") for a in args)


def _result(like, shape, dtype):
  """A custom-call result type: `shape`/`dtype`, varying over the same axes as `like`; never
  weak, as reference_moe's results are not (a weak x would make y and the weight gradients
  weak, and y + a bfloat16 array bfloat16)."""
  return jax.typeof(like).update(shape=tuple(shape), dtype=jnp.dtype(dtype), weak_type=False)


def check_residuals(residuals) -> None:
  """`residuals` must name one of RESIDUALS."""
  if residuals not in RESIDUALS:
    raise ValueError(f"residuals must be one of {RESIDUALS}, got {residuals!r}")


def _kept_rows(residuals: str, tokens: int, k: int, gate_ffn: int, *, platform: str,
               plan_slots: int) -> int:
  """C, the rows of h = x @ w_in each device keeps for the backward under `residuals`; none on
  GPU under a plan with helper slots, where a device's pairs are no longer one slice of the
  CUDA handler's work list and its backward recomputes them all.

  Where kept rows live: on the device that computed them, in its own forward result
  `[C, G*F]` float32, C = T*K: the mean load. A device's load is data dependent (up to D*T*K
  rows) while XLA's shapes are static, so a busier device keeps the GEMM tiles among the first
  T*K rows of its work list and recomputes the rest (with a `reassign` plan every device is within
  10% or a tile of the mean). h is kept in float32, exactly what the backward would recompute,
  so results are bitwise those of `residuals="inputs"`. Keeping each row at its source instead
  (`[T, K, G*F]` per device, written through peer memory like the staging rows) holds every row
  in the same bytes, but moves G*F float32 per pair across the interconnect twice: for F = 4H
  that is 16 times the bfloat16 dispatch of x, more time on GPUs than the GEMM it saves.
  """
  check_residuals(residuals)
  rows = tokens * k
  if platform == "gpu" and plan_slots > 1:
    return 0
  if residuals == "auto":
    residuals = "hidden" if rows * gate_ffn * 4 <= residual_budget_bytes() else "inputs"
  return rows if residuals == "hidden" else 0


def plan_partial_bytes(w_in, w_out, *, slots: int) -> int:
  """Bytes of the float32 weight gradients a GPU backward under a plan keeps per call: `slots`
  of each expert of `w_in` `[E, H, G*F]` and `w_out` `[E, F, H]` (a device's, or all D
  emulated devices' experts)."""
  return slots * w_out.shape[0] * (math.prod(w_in.shape[1:]) + math.prod(w_out.shape[1:])) * 4


def _check_plan_partials(static: _Static, w_in, w_out) -> None:
  """On GPU, the backward under a plan of S helpers that wants weight gradients keeps S + 1
  float32 weight gradients of each of its experts in scratch (the owner's and each helper
  slot's, summed in slot order once the helpers are done): E_local * (S + 1) * (H*G*F + F*H) * 4
  bytes, `D` times that emulated. They may take half the scratch budget, leaving the other half
  to the chunks' rows; more is refused here rather than run in chunks of one M-tile, or past
  the budget. (Peers in other processes take no plan with helpers on GPU: check_gpu_group
  refuses it.)"""
  if static.platform != "gpu" or static.devices or static.plan_slots <= 1:
    return
  per_slot, budget = plan_partial_bytes(w_in, w_out, slots=1), static.scratch_budget
  nbytes = static.plan_slots * per_slot
  if 2 * nbytes <= budget:
    return
  fits = budget // (2 * per_slot)  # slots whose partials take at most half the budget
  smaller = (f"make the plan with reassign(max_helpers={fits - 1})" if fits > 1 else
             "use no plan (no plan with helpers fits)")
  raise ValueError(
      f"jax_ccfuser: on GPU the backward under a reassignment plan with {static.plan_slots} "
      f"slots keeps float32 weight gradients of each of its {w_out.shape[0]} experts once per "
      f"slot, {nbytes:,} bytes of scratch: more than half the scratch budget ({budget:,} bytes). "
      f"Raise jax_ccfuser.scratch_budget to at least {2 * nbytes:,} bytes, or {smaller}")


_FORWARD_MODE = (
    "jax_ccfuser.fused_moe supports reverse-mode differentiation only (jax.grad, jax.vjp, "
    "jax.value_and_grad, jax.jacrev, once); forward mode (jax.jvp, jax.linearize, "
    "jax.jacfwd, jax.hessian) and differentiating its gradient again are not supported.")


def _refuse_forward_mode(*_, **__):
  raise TypeError(_FORWARD_MODE)


def _reverse_only(nondiff_argnums):
  """A custom call's wrapper as a `custom_jvp` whose rule refuses by name.

  The calls themselves have no derivative; reached by a second differentiation (`jax.hessian`,
  a gradient of a gradient, also through `jax.jit`) JAX would only say that an FFI call cannot
  be differentiated.
  """
  def wrap(call):
    refusing = jax.custom_jvp(call, nondiff_argnums=nondiff_argnums)
    refusing.defjvp(_refuse_forward_mode)
    return refusing
  return wrap


@_reverse_only(nondiff_argnums=(0, 1))
def _forward_call(static, keep, x, ids, weights, w_in, w_out, workers, bounds, rank, group):
  """y `[T, H]` and the kept h rows `[C, G*F]` float32 (`[D*C, G*F]` emulated; none unless
  `keep`, as a forward that is not differentiated keeps nothing: `_hidden_shape`)."""
  if static.platform == "gpu":
    d = static.num_devices
    check_gpu_group(d, w_out.shape[0] // d if static.emulated else w_out.shape[0],
                    static.plan_slots, emulated=static.emulated,
                    across_processes=bool(static.devices))
  args = _varying_alike(x, ids, weights, w_in, w_out, workers, bounds, rank, group)
  kept = static.kept_rows if keep else 0
  region = _reserve_region(static, False, x, ids, weights, w_in, w_out)
  call = jax.ffi.ffi_call(
      "ccf_moe_fwd",
      (_result(args[0], x.shape, x.dtype),
       _result(args[0], _staging_shape(static, region, x, ids), jnp.float32),
       _result(args[0], _hidden_shape(static, kept, w_in.shape[2]), jnp.float32)),
      vmap_method="sequential")
  y, _, hidden = call(*args, **_call_attrs(static, False, region, kept).as_ffi())
  return y, hidden


@_reverse_only(nondiff_argnums=(0, 1))
def _backward_call(static, weight_grads, x, ids, weights, w_in, w_out, workers, bounds, rank,
                   group, hidden, dy):
  """`(dx, dweights, dw_in, dw_out)` for the cotangent `dy` `[T, H]` of y, from the inputs and
  the h rows the forward kept. Without `weight_grads` dw_in and dw_out are not wanted: the
  handlers skip their GEMMs and return zeros."""
  if dy.shape != x.shape:
    raise ValueError(f"cotangent shape {dy.shape} != output shape {x.shape}")
  expected = _hidden_shape(static, static.kept_rows, w_in.shape[2])
  if hidden.shape != expected or hidden.dtype != jnp.float32:
    raise ValueError(f"kept hidden rows {hidden.shape} {hidden.dtype} do not fit this call: "
                     f"expected {list(expected)} float32")
  if weight_grads:  # frozen experts' backward takes no partials
    _check_plan_partials(static, w_in, w_out)
  args = _varying_alike(x, ids, weights, w_in, w_out, workers, bounds, dy.astype(x.dtype),
                        hidden, rank, group)
  like = args[0]
  region = _reserve_region(static, True, x, ids, weights, w_in, w_out)
  call = jax.ffi.ffi_call(
      "ccf_moe_bwd",
      (_result(like, x.shape, x.dtype), _result(like, weights.shape, weights.dtype),
       _result(like, w_in.shape, w_in.dtype), _result(like, w_out.shape, w_out.dtype),
       _result(like, _staging_shape(static, region, x, ids), jnp.float32)),
      vmap_method="sequential")
  dx, dweights, dw_in, dw_out, _ = call(
      *args, **_call_attrs(static, True, region, static.kept_rows, weight_grads).as_ffi())
  return dx, dweights, dw_in, dw_out


# The op's tangent map at a point: linear in the tangents of (x, weights, w_in, w_out), given the
# inputs and the kept h rows. Reverse mode transposes it into the backward custom call;
# evaluating it is forward mode, refused by name (also where `jax.jit` lowers it).
_linear_p = jax.extend.core.Primitive("ccf_moe_linear")
_linear_p.def_impl(_refuse_forward_mode)
_linear_p.def_abstract_eval(lambda x, *_, static: x)  # operands are varying alike
mlir.register_lowering(_linear_p, _refuse_forward_mode)

_DIFFERENTIABLE = (0, 2, 3, 4)  # x, weights, w_in, w_out among the operands


def _linear_transpose(dy, *operands, static):
  inputs, tangents = operands[:-len(_DIFFERENTIABLE)], operands[-len(_DIFFERENTIABLE):]
  if type(dy) is ad.Zero:
    return [None] * len(operands)
  # Frozen experts (no cotangent wanted for w_in or w_out) skip the weight-gradient GEMMs.
  weight_grads = any(map(ad.is_undefined_primal, tangents[2:]))
  grads = _backward_call(static, weight_grads, *inputs, dy)
  return [None] * len(inputs) + [g if ad.is_undefined_primal(t) else None
                                 for g, t in zip(grads, tangents)]


def _linear_batched(operands, dims, *, static):
  """`vmap` of the tangent map (reached by differentiating a vmapped op): one batch element at a
  time, as the custom calls themselves are batched."""
  mapped = [d is not None for d in dims]  # JAX marks an unbatched operand None

  def one(slices):
    it = iter(slices)
    return _linear_p.bind(*(next(it) if m else o for o, m in zip(operands, mapped)),
                          static=static)

  batched = [jnp.moveaxis(o, d, 0) for o, d, m in zip(operands, dims, mapped) if m]
  return jax.lax.map(one, batched), 0


ad.primitive_transposes[_linear_p] = _linear_transpose
batching.primitive_batchers[_linear_p] = _linear_batched


# The kept h rows' name for `jax.checkpoint` policies (`save_only_these_names`).
_KEPT_ROWS_NAME = "fused_moe_kept_rows"


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _fused(static, *operands):
  """The op every entry point calls: y `[T, H]`."""
  return _forward_call(static, False, *operands)[0]


@_fused.defjvp
def _fused_jvp(static, primals, tangents):
  # What reverse mode keeps are the inputs and the kept h rows: no dispatched rows or expert
  # outputs; the backward call re-reads the rows from the peers. Keeping none, its one unused row
  # is made here, not by the forward call: a backward that rematerialises the forward
  # (`jax.checkpoint`, `nnx.remat`) then has no need to run the call, and its exchange, again.
  if static.kept_rows:
    y, hidden = _forward_call(static, True, *primals)
    # A remat policy that saves this name keeps them through a rematerialised forward too.
    hidden = checkpoint_name(hidden, _KEPT_ROWS_NAME)
  else:
    y = _forward_call(static, False, *primals)[0]
    hidden = jnp.zeros(_hidden_shape(static, 0, primals[3].shape[2]), jnp.float32)
  y_dot = _linear_p.bind(
      *_varying_alike(*primals, hidden, *(tangents[i] for i in _DIFFERENTIABLE)),
      static=static)
  return y, y_dot


def _position(axis_name):
  """This device's rank on `axis_name` and the index of its group over the other manual axes.

  Returns:
    Two int32 scalars.
  """
  if axis_name is None:
    return jnp.int32(0), jnp.int32(0)
  rank = jax.lax.axis_index(axis_name)
  ep_axes = _topology.axis_names(axis_name)
  mesh = jax.sharding.get_abstract_mesh()
  group = jnp.int32(0)
  for name, kind in zip(mesh.axis_names, mesh.axis_types):
    # An axis of size 1 numbers nothing, and its index would type the results as varying over
    # it, which a shard_map whose out_specs leave it out refuses.
    if kind == AxisType.Manual and name not in ep_axes and mesh.shape[name] > 1:
      group = group * mesh.shape[name] + jax.lax.axis_index(name)
  return rank.astype(jnp.int32), group.astype(jnp.int32)


def _plan_operands(plan, num_experts, num_devices):
  """The plan's `(workers [E, S + 1], bounds [E, S + 2])`, or the trivial plan's."""
  if plan is None:
    return identity_workers(num_experts, num_devices)
  if not isinstance(plan, Plan):
    raise ValueError(f"plan must come from jax_ccfuser.reassign, got {type(plan).__name__}")
  names = ("workers", "bounds", "loads_before", "loads_after")
  arrays = [getattr(plan, name) for name in names]
  if ([np.ndim(a) for a in arrays] != [2, 2, 1, 1]
      or any(np.dtype(a.dtype) != np.int32 for a in arrays)
      or plan.bounds.shape != (plan.workers.shape[0], plan.workers.shape[1] + 1)):
    got = ", ".join(f"{name} {np.dtype(a.dtype).name}{list(np.shape(a))}"
                    for name, a in zip(names, arrays))
    raise ValueError("plan must hold int32 workers [E, S + 1], bounds [E, S + 2] and loads [D] "
                     "as reassign returns them (a tree-wide astype changes its integers too); "
                     f"got {got}")
  if plan.workers.shape[0] != num_experts:
    raise ValueError(f"plan is for {plan.workers.shape[0]} experts, this call has {num_experts}")
  if plan.loads_before.shape[0] != num_devices:
    raise ValueError(f"plan is for a group of {plan.loads_before.shape[0]} devices, this call's "
                     f"has {num_devices}: make it with reassign(..., axis_name=) over this "
                     f"call's expert axis")
  return plan.workers, plan.bounds


def _replication(plan, split):
  """The plan's cross-host part, checked against the hosts the call spans, or `None`."""
  replication = None if plan is None else plan.replication
  if replication is None:
    return None
  hosts = replication.experts.shape[:2]
  if hosts != (split.num_hosts, split.per_host):
    raise ValueError(f"plan replicates experts over {hosts[0]} hosts of {hosts[1]} devices; "
                     f"this call spans {split.num_hosts} of {split.per_host}")
  return replication


@numpy_broadcasting
@jax.named_call
def fused_moe(x: Operand, expert_ids: Operand, expert_weights: Operand, w_in: Operand,
              w_out: Operand, *, axis_name: str | None = None, activation: str = "swiglu",
              plan: Plan | None = None, residuals: str = "inputs") -> jax.Array:
  """The MoE FFN with expert parallelism and no all-to-all.

  `y[t] = sum_k expert_weights[t, k] * FFN_{expert_ids[t, k]}(x[t])`. Inside `jax.shard_map` over
  `axis_name` (size D), each device computes the rows routed to its own experts by reading them
  straight out of the other devices' `x`, and each device sums the K contributions to its tokens
  in a fixed order (deterministic, dropless). Gradients flow to `x`, `expert_weights`, `w_in` and
  `w_out` (a backward wanting none for `w_in` and `w_out`, as with frozen experts, skips their
  GEMMs); the backward pass keeps no dispatched rows (its residuals are the inputs:
  x `[T, H]`, the routing `[T, K]` and the weights) and re-reads the rows from the peers. It
  recomputes each row's hidden activation `h = x @ w_in` unless asked to keep it
  (`residuals`): keeping costs `T * K * G * F * 4` bytes per device (G = 2 for gated
  activations, else 1), recomputing adds 22% to the forward+backward FLOPs (17% for non-gated
  activations); the results are the same bitwise. float32 GEMMs on a GPU run exact unless
  traced under `jax.default_matmul_precision` set to "tensorfloat32", "high", "bfloat16" or
  another of the README's TF32 list (not "default"): then as TF32.

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
    axis_name: the expert-parallel mesh axis of the enclosing `shard_map`, which must be manual
      over every mesh axis of size > 1 (the others number the groups), or `None` when one
      device holds all experts. Each index of another axis of size > 1 runs a group of its
      own, so y varies over those axes even where the operands do not (tokens replicated over
      a tensor-parallel axis are computed once on each of its devices): name them in
      `out_specs`, or split the tokens over them too.
    activation: "swiglu", "geglu", "gelu" (exact erf form), "relu" or "silu".
    plan: `None`, or a plan from `jax_ccfuser.reassign` for the same `expert_ids` (across
      hosts, one with `replicas` also computes hot experts on the other hosts).
    residuals: what the backward pass starts from. "inputs" (the default): the inputs, h is
      recomputed. "hidden": the forward also keeps h for up to `T * K` computed rows per device
      (float32 `[T*K, G*F]`, G = 2 for gated activations; a device computing more rows than that
      recomputes the rest). "auto": "hidden" when those `T * K * G * F * 4` bytes fit the budget
      in force (`jax_ccfuser.residual_budget`, 256 MiB per device by default), else "inputs".
      Decided when the call is traced; a forward that is not differentiated keeps nothing, nor
      does one on GPU with a `reassign` plan that has helper slots. Under `jax.checkpoint`
      (`nnx.remat`, `nn.remat`) a backward that keeps nothing runs no forward call again;
      kept rows it rematerialises by running the call again (and its exchange: more work than
      "inputs"), unless the policy saves them by their name, "fused_moe_kept_rows"
      (`jax.checkpoint_policies.save_only_these_names("fused_moe_kept_rows")`).

  Returns:
    `[T, H]`, x's dtype.

  Raises:
    ValueError: when traced, for ranks, shapes, dtypes, an `activation`, `residuals` or `plan`
      that do not fit, an `axis_name` no enclosing `shard_map` maps, or a `shard_map` that is
      not manual over every mesh axis of size > 1.
    TypeError: under forward-mode differentiation (`jax.jvp`, `jax.jacfwd`): reverse mode only.
    jax.errors.JaxRuntimeError: when run, for an id out of range (INVALID_ARGUMENT, naming it
      and its device) or a peer that does not make the call within `jax_ccfuser.peer_timeout`
      (DEADLINE_EXCEEDED, naming the devices that never came); other errors name their cause.

  Examples:
    Eight devices, two of the 16 experts (H = 16, F = 32) and 8 of the 64 tokens on each:

    >>> from jax.sharding import AxisType, PartitionSpec as P
    >>> mesh = jax.make_mesh((8,), ("ep",), axis_types=(AxisType.Auto,))
    >>> kx, kr, ki, ko = jax.random.split(jax.random.key(0), 4)
    >>> x = jax.random.normal(kx, (64, 16))
    >>> ids, weights, _ = jax_ccfuser.route(jax.random.normal(kr, (64, 16)), 2)
    >>> w_in = jax.random.normal(ki, (16, 16, 64)) / 4  # [E, H, 2F]: gate and up halves
    >>> w_out = jax.random.normal(ko, (16, 32, 16)) / 6  # [E, F, H]
    >>> def layer(x, ids, weights, w_in, w_out):  # per device: x [8, 16], w_in [2, 16, 64]
    ...   return jax_ccfuser.fused_moe(x, ids, weights, w_in, w_out, axis_name="ep",
    ...                                residuals="auto")
    >>> layer = jax.jit(jax.shard_map(layer, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
    >>> y = layer(x, ids, weights, w_in, w_out)
    >>> y.shape, y.dtype
    ((64, 16), dtype('float32'))
    >>> bool(jnp.allclose(y, jax_ccfuser.reference_moe(x, ids, weights, w_in, w_out),
    ...                   rtol=1e-5, atol=1e-5))
    True

    Gradients, as for any JAX function:

    >>> loss = lambda *args: jnp.sum(layer(*args) ** 2)
    >>> dx, dw_in = jax.grad(loss, argnums=(0, 3))(x, ids, weights, w_in, w_out)
    >>> dx.shape, dw_in.shape
    ((64, 16), (16, 16, 64))
  """
  (x, expert_ids, expert_weights, w_in, w_out), dims = check_moe_args(
      x, expert_ids, expert_weights, w_in, w_out, activation=activation, axis_name=axis_name)
  _topology.check_every_axis_manual(axis_name)
  shapes = [a.shape for a in (x, expert_ids, expert_weights, w_in, w_out)]
  if axis_name is not None and not all(isinstance(d, int) for s in shapes for d in s):
    # XLA's shape refinement crashes the process on such a call inside shard_map.
    raise ValueError(f"fused_moe in a shard_map takes static shapes (jax.export with symbolic "
                     f"dimensions cannot run it); got {shapes}")
  split = _topology.split(axis_name, dims.num_devices)
  platform = _topology.platform(split)
  if platform == "gpu":
    check_gpu_limits(dims, x.dtype)
  if dims.num_devices > 1 and jax.default_backend() == "cpu":
    _cpu_threads.check_pool(jax.local_device_count())
  workers, bounds = _plan_operands(plan, dims.num_experts, dims.num_devices)
  replication = _replication(plan, split)
  kept_rows = _kept_rows(residuals, dims.tokens, dims.k, w_in.shape[2], platform=platform,
                         plan_slots=workers.shape[1])
  settings = _traced_settings()
  if dims.tokens == 0:
    return no_tokens(x)
  if split.num_hosts > 1 or split.shared:
    n, m = split.num_hosts, split.per_host
    path = " and ".join(p for p, used in (("shared memory", split.shared),
                                          ("XLA collectives", n > 1)) if used)
    where = f"{n} host{'s' * (n > 1)} of {m} device{'s' * (m > 1)} through {path}"
    _workspace.agree_across_processes(
        platform, _describe("forward", activation, where, workers.shape[1], x, expert_ids,
                            expert_weights, w_in, w_out), peer_timeout_ms())
  if split.num_hosts > 1:
    return _across_hosts(x, expert_ids, expert_weights, w_in, w_out, workers, bounds,
                         replication, axis_name=axis_name, activation=activation, split=split,
                         kept_rows=kept_rows)
  static = _Static(site=next(_sites), num_devices=dims.num_devices, emulated=False,
                   activation=activation, **settings,
                   num_experts=dims.num_experts, devices=split.devices,
                   platform=platform, plan_slots=workers.shape[1], kept_rows=kept_rows)
  rank, group = _position(axis_name)
  return _fused(static, x, expert_ids, expert_weights, w_in, w_out, workers, bounds, rank, group)


def _host_ids(ids, replication, *, block, place, per_host, experts_local):
  """The gathered pairs' ids as this host's fused call numbers its slots.

  Device c of the host holds its `E_local` experts, then its `(N - 1) R` guest slots (ids
  `c * (E_local + (N - 1) R) + ...`, see `Replication`). A pair of one of the host's experts
  that no other host shares, or this host's share of an exported expert, gets its slot's id;
  every other valid pair the first id past the host's slots, which the call skips; out-of-range
  ids stay out of range (as they are while no guest slot pushes the range past E), to be
  reported.

  Args:
    ids: `[N, T, K]` int32, the pairs gathered from the device of rank `place` on every host.
    replication: the plan's `Replication`, or `None`.

  Returns:
    `(ids [N*T, K] int32, num_experts)`: the ids and the call's valid range.
  """
  n = ids.shape[0]
  num_experts = n * per_host * experts_local
  replicas = 0 if replication is None else replication.experts.shape[2]
  slots = experts_local + (n - 1) * replicas
  skip = per_host * slots
  limit = max(num_experts, skip + 1)
  valid = (ids >= 0) & (ids < num_experts)
  e = jnp.where(valid, ids, 0)
  owner = e // (per_host * experts_local)
  device = (e // experts_local) % per_host
  slot = device * slots + e % experts_local
  here = owner == block
  if replication is not None:
    flat = replication.experts.reshape(-1)
    exported = jnp.full(num_experts + 1, -1, jnp.int32).at[
        jnp.where(flat >= 0, flat, num_experts)].set(jnp.arange(flat.size, dtype=jnp.int32))
    x = exported[e]
    xs = jnp.maximum(x, 0)
    # The pair's place in its expert's rows over the whole group: (source, token, k) order.
    source = jnp.arange(n, dtype=jnp.int32)[:, None, None] * per_host + place
    offsets = replication.offsets.reshape(replication.offsets.shape[0], -1)
    # Each source's pairs in (token, k) order.
    within = jax.vmap(rank_within_expert)(jnp.where(valid, ids, num_experts).reshape(n, -1))
    order = offsets[source, xs] + within.reshape(ids.shape)
    shares = replication.shares.reshape(-1, n + 1)[xs]
    computing = jnp.sum(shares[..., 1:n] <= order[..., None], -1)
    here = jnp.where(x >= 0, computing == block, here)
    guest = (device * slots + experts_local + (owner - block - 1) % n * replicas
             + xs % replicas)
    slot = jnp.where((x >= 0) & (owner != block), guest, slot)
  out = jnp.where(valid, jnp.where(here, slot, skip),
                  jnp.where(ids >= num_experts, ids + (limit - num_experts), ids))
  return out.reshape(-1, ids.shape[2]).astype(jnp.int32), limit


def _with_guests(w, replication, gather, *, block, place, per_host):
  """`w` `[E_local, ...]` followed by this device's guest slots `[(N - 1) R, ...]`: the experts
  the devices of its rank on the other hosts export, gathered over the hosts (only those R
  experts of each device move; their gradients return by the gather's transpose)."""
  experts = replication.experts
  n, e_local = experts.shape[0], w.shape[0]
  mine = experts[block, place] - (block * per_host + place) * e_local
  everyone = gather(jnp.take(w, jnp.clip(mine, 0, e_local - 1), axis=0))  # [N, R, ...]
  others = (block + 1 + jnp.arange(n - 1)) % n
  return jnp.concatenate([w, jnp.take(everyone, others, axis=0).reshape((-1,) + w.shape[1:])])


def _host_plan(workers, bounds, replication, *, block, per_host, experts_local):
  """The plan's `(workers, bounds)` for this host's slots, its device numbers local."""
  here = per_host * experts_local
  workers, bounds = (jax.lax.dynamic_slice_in_dim(a, block * here, here)
                     for a in (workers, bounds))
  if replication is not None:
    join = lambda own, guest: jnp.concatenate(
        [own.reshape(per_host, experts_local, -1), guest[block]], 1).reshape(-1, own.shape[1])
    workers, bounds = join(workers, replication.workers), join(bounds, replication.bounds)
  return jnp.where(workers >= 0, workers - block * per_host, -1), bounds


def _across_hosts(x, expert_ids, expert_weights, w_in, w_out, workers, bounds, replication, *,
                  axis_name, activation, split, kept_rows):
  """`fused_moe` over several hosts: collectives between hosts, shared memory within each.

  Every token goes to every host of its group once (an `all_gather` over the devices with the
  same rank in each host's block: with static shapes that is the worst case of a dropless
  dispatch, and far less than the `[D, T*K]` of a dropless `all_to_all`). Each host runs the
  custom calls over its own devices for the pairs of its own experts, and an `all_to_all`
  hands each token's per-host partial sums back, summed in host order. A reassignment plan
  (`reassign` keeps helpers on their expert's host) runs as each host's part of it: a slot's
  rows are then counted in the host's own order, which splits them differently but as evenly.
  With `replication`, each host also computes its share of the experts the other hosts export,
  with their weights gathered into guest slots. A device keeps `kept_rows` h rows, the mean of
  its own T, not of the N*T rows gathered.
  """
  n, per_host = split.num_hosts, split.per_host
  t, h = x.shape
  e_local = w_out.shape[0]
  same_place = [[b * per_host + r for b in range(n)] for r in range(per_host)]
  gather = lambda a: jax.lax.all_gather(a, axis_name, axis_index_groups=same_place)
  flat = lambda a: a.reshape((n * t,) + a.shape[2:])
  rank, group = _position(axis_name)
  block, place = rank // per_host, rank % per_host
  where = dict(block=block, per_host=per_host)
  ids, num_experts = _host_ids(gather(expert_ids), replication, place=place,
                               experts_local=e_local, **where)
  workers, bounds = _host_plan(workers, bounds, replication, experts_local=e_local, **where)
  if replication is not None:
    w_in, w_out = (_with_guests(w, replication, gather, place=place, **where)
                   for w in (w_in, w_out))
  static = _Static(site=next(_sites), num_devices=per_host, emulated=False,
                   activation=activation, **_traced_settings(),
                   num_experts=num_experts, devices=split.devices, platform=split.platform,
                   plan_slots=workers.shape[1], kept_rows=kept_rows)
  partial = _fused(static, flat(gather(x)), ids, flat(gather(expert_weights)), w_in, w_out,
                   workers, bounds, place, group * n + block)
  back = jax.lax.all_to_all(partial.reshape(n, t, h), axis_name, 0, 0,
                            axis_index_groups=same_place)
  return jnp.sum(back.astype(jnp.float32), axis=0).astype(x.dtype)


@numpy_broadcasting
@jax.named_call
def fused_moe_emulated(x: Operand, expert_ids: Operand, expert_weights: Operand,
                       w_in: Operand, w_out: Operand, *, num_devices: int,
                       activation: str = "swiglu", plan: Plan | None = None,
                       residuals: str = "inputs") -> jax.Array:
  """`fused_moe` for `num_devices` emulated peers whose buffers all live on one device.

  The operands stack the D devices' blocks along their leading axis, as the global arrays of
  a `shard_map` over D devices would: x `[D*T, H]`, expert_ids/expert_weights `[D*T, K]`, w_in
  `[D*E_local, H, G*F]`, w_out `[D*E_local, F, H]`. The same handler and kernels run, with the
  peer table pointing into these blocks, so the remote-read path is exercised (and timed) on a
  single device. Results equal `fused_moe` over D real devices of one process, bitwise but for
  the weight gradients on Hopper in 16-bit dtypes when the call runs in several chunks
  (`jax_ccfuser.scratch_budget`), whose edges then fall elsewhere in the work list; each emulated
  device keeps its own `T * K` h rows under `residuals="hidden"`. On CPU each emulated device
  computes with a real one's share of the cores (a D-th, at least one), since the GEMMs' column
  blocks, and so their rounding, follow it: with D or more cores it takes up to D times as long
  as the same work on every core.

  Args:
    x: `[D*T, H]` float32/bfloat16/float16, the D devices' tokens, device d's in rows
      `d*T ... (d+1)*T - 1`.
    expert_ids: `[D*T, K]` int32, global expert ids in `[0, D * E_local)`.
    expert_weights: `[D*T, K]`, x's dtype or float32: the combine weights.
    w_in: `[D*E_local, H, G*F]` (G = 2 for gated activations), device d's experts in blocks of
      E_local, as `fused_moe`'s global w_in.
    w_out: `[D*E_local, F, H]`.
    num_devices: D, the emulated devices; T and E_local must split evenly over them.
    activation: as `fused_moe`'s.
    plan: `None`, or the plan `jax_ccfuser.reassign` makes for these ids over D devices (the
      same on each: one device's copy, from a `shard_map` or a `jax.vmap` over the D blocks
      with an `axis_name`).
    residuals: as `fused_moe`'s.

  Returns:
    `[D*T, H]`, x's dtype: `fused_moe`'s y of each device, stacked.

  Examples:
    Four emulated devices of one expert each; on one device it equals the reference:

    >>> x = jax.random.normal(jax.random.key(0), (32, 16))
    >>> ids, weights, _ = jax_ccfuser.route(x[:, :4], 2)
    >>> w_in = jax.random.normal(jax.random.key(1), (4, 16, 64)) / 4
    >>> w_out = jax.random.normal(jax.random.key(2), (4, 32, 16)) / 6
    >>> y = jax_ccfuser.experimental.fused_moe_emulated(x, ids, weights, w_in, w_out,
    ...                                                 num_devices=4)
    >>> y.shape, bool(jnp.allclose(y, jax_ccfuser.reference_moe(x, ids, weights, w_in, w_out),
    ...                            atol=1e-5))
    ((32, 16), True)
  """
  num_devices = check_count("num_devices", num_devices)
  (x, expert_ids, expert_weights, w_in, w_out), dims = check_moe_args(
      x, expert_ids, expert_weights, w_in, w_out, activation=activation, axis_name=None)
  if dims.tokens % num_devices or dims.num_experts % num_devices:
    raise ValueError(f"x rows {dims.tokens} and experts {dims.num_experts} must split evenly "
                     f"over {num_devices} emulated devices")
  platform = _topology.platform()
  if platform == "gpu":
    check_gpu_limits(dims, x.dtype)
  workers, bounds = _plan_operands(plan, w_out.shape[0], num_devices)
  _replication(plan, _topology.Split(1, num_devices, False, ()))
  static = _Static(site=next(_sites), num_devices=num_devices, emulated=True,
                   activation=activation, **_traced_settings(),
                   num_experts=w_out.shape[0], platform=platform, plan_slots=workers.shape[1],
                   kept_rows=_kept_rows(residuals, x.shape[0] // num_devices, dims.k,
                                        w_in.shape[2], platform=platform,
                                        plan_slots=workers.shape[1]))
  if x.shape[0] == 0:
    return no_tokens(x)
  return _fused(static, x, expert_ids, expert_weights, w_in, w_out, workers, bounds,
                jnp.int32(0), jnp.int32(0))
