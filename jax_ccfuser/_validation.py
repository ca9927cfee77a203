"""Argument checks shared by every MoE path; each fault is a `ValueError` at trace time."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_ccfuser._ffn import ACTIVATIONS

_X_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


class MoeDims(NamedTuple):
  """Static sizes of one MoE call, per device."""
  tokens: int         # T
  hidden: int         # H
  k: int              # K
  ffn: int            # F
  experts_local: int  # E_local
  num_devices: int    # D, the size of the expert-parallel axis (1 without one)
  gated: bool

  @property
  def num_experts(self) -> int:
    return self.num_devices * self.experts_local


def axis_size(axis_name) -> int:
  """Size of `axis_name` in the enclosing `shard_map` (1 for `None`), or a clear error."""
  if axis_name is None:
    return 1
  try:
    return int(jax.lax.axis_size(axis_name))
  except NameError:
    raise ValueError(
        f"axis_name={axis_name!r} is not bound here: call this inside jax.shard_map over a mesh "
        "with that axis, or pass axis_name=None when one device holds all experts") from None


def _is_int(value) -> bool:
  """Bools and floats are not ints here: 2.0 passes range checks and hashes as 2, so traces keyed
  on the one would serve (and break) the other."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def known_now(value):
  """`value` as a NumPy value where it is known while tracing (a Python or NumPy number, or a
  concrete `jax.Array`, on which jit would stage a comparison), or None for a Tracer."""
  return None if isinstance(value, jax.core.Tracer) else np.asarray(value)


def _check_not_traced(name: str, value) -> None:
  if isinstance(value, jax.core.Tracer):
    raise ValueError(f"{name} must be an int known while tracing, got the traced {value}: pass "
                     f"it as a static argument (jax.jit(..., static_argnames={name!r}))")


def check_int(name: str, value) -> int:
  """`value` as a Python int (see `_is_int`)."""
  _check_not_traced(name, value)
  if not _is_int(value):
    raise ValueError(f"{name} must be an int, got {value!r}")
  return int(value)


def check_count(name: str, value) -> int:
  """`value` as a positive Python int (a shape, a number of devices or experts)."""
  _check_not_traced(name, value)
  if not _is_int(value) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return int(value)


def check_activation(activation) -> str:
  """Returns `activation`, which must name one of ACTIVATIONS."""
  if not isinstance(activation, str) or activation not in ACTIVATIONS:
    raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
  return activation


def check_num_experts(num_experts: int, num_devices: int) -> int:
  """Returns experts per device; `num_experts` must split evenly over the devices."""
  num_experts = check_count("num_experts", num_experts)
  if num_experts % num_devices:
    raise ValueError(f"num_experts={num_experts} is not divisible by the expert-parallel axis "
                     f"size {num_devices}")
  return num_experts // num_devices


# The CUDA path's limits (cuda/config.cuh): routing choices per token (kMaxTopK), devices of one
# call's group (kMaxPeers), experts times plan slots in one work list (kMaxExpertsHere).
GPU_MAX_TOP_K = 3072
GPU_MAX_PEERS = 8
GPU_MAX_EXPERTS_HERE = 1024


def check_gpu_limits(dims: MoeDims, dtype) -> None:
  """The CUDA kernels' shape limits, at trace time: bfloat16/float16 tiles move 16-byte vectors
  (8 elements) along H and F, so both must be multiples of 8 on GPU, and K is at most
  `GPU_MAX_TOP_K`."""
  if np.dtype(dtype) != np.float32 and (dims.hidden % 8 or dims.ffn % 8):
    raise ValueError(f"fused_moe on GPU needs H and F to be multiples of 8 for "
                     f"{np.dtype(dtype).name}; got H={dims.hidden}, F={dims.ffn} (pad them, or "
                     f"use float32)")
  if dims.k > GPU_MAX_TOP_K:
    raise ValueError(f"fused_moe on GPU takes at most {GPU_MAX_TOP_K} routing choices per token; "
                     f"got K={dims.k}")


def check_gpu_group(num_devices: int, experts_local: int, plan_slots: int, *, emulated: bool,
                    across_processes: bool) -> None:
  """The CUDA handler's limits on one call's group, at trace time: at most `GPU_MAX_PEERS`
  devices, at most `GPU_MAX_EXPERTS_HERE` experts times plan slots in one work list (a device's
  own experts; the group's where it emulates its devices, is alone or has a plan with helper
  slots), and no plan with helper slots where peers live in other processes."""
  if across_processes and plan_slots > 1:
    raise ValueError(f"fused_moe on GPU takes no reassignment plan with helper slots ({plan_slots} "
                     f"here) where the group's devices live in several processes; call it with "
                     f"plan=None there")
  if num_devices > GPU_MAX_PEERS:
    raise ValueError(f"fused_moe on GPU takes groups of at most {GPU_MAX_PEERS} devices; this "
                     f"call's has {num_devices}")
  group = num_devices * experts_local
  here = group if plan_slots > 1 or emulated or num_devices == 1 else experts_local
  if here * plan_slots <= GPU_MAX_EXPERTS_HERE:
    return
  fits = GPU_MAX_EXPERTS_HERE // group  # plan slots that fit
  smaller = (f"make the plan with reassign(max_helpers={fits - 1})" if fits > 1 else
             "use no plan")
  raise ValueError(
      f"fused_moe on GPU takes at most {GPU_MAX_EXPERTS_HERE} experts x plan slots in one work "
      f"list; this call's has {here} experts x {plan_slots} slots: "
      f"{smaller if plan_slots > 1 else 'use more devices or fewer experts'}")


def _dtype_name(a) -> str:
  return np.dtype(a.dtype).name


def explicit_split_axes(a) -> list:
  """The explicit mesh axes (`jax.make_mesh`'s default) that `a`'s type says it is split over."""
  spec = getattr(getattr(jax.typeof(a), "sharding", None), "spec", None) or ()
  return [n for entry in spec if entry is not None
          for n in (entry if isinstance(entry, tuple) else (entry,))]


def _check_whole(**operands) -> None:
  """Refuses operands split over explicit mesh axes where the call takes them whole
  (`axis_name=None`): an explicit split says each device holds a part, and no rule divides the
  layer's work among parts."""
  for name, a in operands.items():
    if axes := explicit_split_axes(a):
      raise ValueError(
          f"{name} is split over the explicit mesh axes {axes}, but axis_name=None takes every "
          f"operand whole: call this inside jax.shard_map over those axes (each device then runs "
          f"it on its own part), or reshard the operands whole (jax.sharding.reshard(a, P()))")


# What the MoE ops take as operands (`as_operand`): jax arrays, tracers included, and NumPy
# arrays; not Python scalars or lists.
Operand = jax.Array | np.ndarray


def as_operand(name: str, a: Operand) -> jax.Array:
  """`a` as an operand: a NumPy array becomes a jax array with the dtype `jax.jit` gives it
  (float64 is float32 without x64), so a call takes the same operands eagerly as under jit, but
  integers past int32 are refused rather than wrapped into range; jax arrays and tracers pass
  as they are; anything else (a list) is refused, as `jax.numpy` refuses it."""
  if isinstance(a, np.ndarray):
    info = np.iinfo(np.int32)
    if (np.issubdtype(a.dtype, np.integer) and a.size and
        (a.min() < info.min or a.max() > info.max)):
      raise ValueError(f"{name} holds values outside int32 ({a.min()} to {a.max()})")
    return jnp.asarray(a)
  if not hasattr(a, "dtype"):
    raise ValueError(f"{name} must be an array (jax or numpy), got {type(a).__name__}")
  return a


def check_moe_args(x, expert_ids, expert_weights, w_in, w_out, *, activation: str,
                   axis_name) -> tuple[tuple[jax.Array, ...], MoeDims]:
  """Checks the arguments of `fused_moe`, `fused_moe_emulated`, `reference_moe` and
  `all_to_all_moe` (the API contract).

  Operands are taken as `as_operand` takes them.

  Returns:
    The five operands so taken, and the call's `MoeDims`.
  """
  names = ("x", "expert_ids", "expert_weights", "w_in", "w_out")
  x, expert_ids, expert_weights, w_in, w_out = (
      as_operand(name, a) for name, a in zip(names, (x, expert_ids, expert_weights, w_in, w_out)))
  gated = ACTIVATIONS[check_activation(activation)].gated
  for name, a, rank in zip(names, (x, expert_ids, expert_weights, w_in, w_out), (2, 2, 2, 3, 3)):
    if np.ndim(a) != rank:
      raise ValueError(f"{name} must have rank {rank}, got shape {tuple(np.shape(a))}")
  if x.dtype not in _X_DTYPES:
    raise ValueError(f"x must be float32, bfloat16 or float16, got {_dtype_name(x)}")
  if expert_ids.dtype != jnp.int32:
    raise ValueError(f"expert_ids must be int32, got {_dtype_name(expert_ids)}")
  if expert_weights.dtype not in (x.dtype, jnp.float32):
    raise ValueError(f"expert_weights must be float32 or x's dtype ({_dtype_name(x)}), "
                     f"got {_dtype_name(expert_weights)}")
  for name, w in (("w_in", w_in), ("w_out", w_out)):
    if w.dtype != x.dtype:
      raise ValueError(f"{name} must have x's dtype ({_dtype_name(x)}), got {_dtype_name(w)}: "
                       f"cast one side first (e.g. {name}.astype(x.dtype); the Flax layers "
                       f"cast to their `dtype`)")
  t, h = x.shape
  if h < 1:
    raise ValueError(f"x {tuple(x.shape)} has no features (H = 0)")
  if expert_ids.shape[0] != t:
    raise ValueError(f"expert_ids has {expert_ids.shape[0]} rows but x has {t} tokens")
  if expert_weights.shape != expert_ids.shape:
    raise ValueError(f"expert_weights shape {expert_weights.shape} != expert_ids shape "
                     f"{expert_ids.shape}")
  k = expert_ids.shape[1]
  if k < 1:
    raise ValueError("expert_ids must route each token to at least one expert (K >= 1)")
  e_local, f, h_out = w_out.shape
  if h_out != h:
    raise ValueError(f"w_out must be [E_local, F, H={h}], got {w_out.shape}")
  want_in = (e_local, h, 2 * f if gated else f)
  if w_in.shape != want_in:
    raise ValueError(f"w_in must be {list(want_in)} for activation {activation!r} "
                     f"({'gated: [E_local, H, 2F]' if gated else '[E_local, H, F]'}), "
                     f"got {list(w_in.shape)}")
  if e_local < 1 or f < 1:
    raise ValueError(f"w_out {w_out.shape} has no experts or an empty FFN")
  if axis_name is None:
    _check_whole(x=x, expert_ids=expert_ids, expert_weights=expert_weights, w_in=w_in,
                 w_out=w_out)
  dims = MoeDims(tokens=t, hidden=h, k=k, ffn=f, experts_local=e_local,
                num_devices=axis_size(axis_name), gated=gated)
  return (x, expert_ids, expert_weights, w_in, w_out), dims
