"""fused_moe on CUDA GPUs against reference_moe: emulated peers on one GPU, shard_map over every
GPU, dtypes (float32 as TF32 too), activations, K, routing, plans, kept residuals, determinism,
bad ids, non-finite inputs, repeated and queued calls.

Marked `gpu` and skipped, with the reason, where no CUDA device is visible (`make test` here).
`CCF_CUDA_TESTS_PLATFORM=cpu` runs the same tests on the CPU backend's 8 simulated devices
(tests/conftest.py), which checks the tests themselves where no GPU exists:

  CCF_CUDA_TESTS_PLATFORM=cpu pytest tests/test_cuda.py

On a GPU machine `bench/gpu_check.sh` runs this module after building the CUDA extension.
"""

import contextlib
import dataclasses
import functools
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Before any backend starts (the device check below starts them): jax_ccfuser sizes XLA:CPU's
# thread pool at import. Its CUDA handlers are optional (`_extension.cuda`), checked below.
import jax_ccfuser as ccf
from jax_ccfuser import _extension
from jax_ccfuser._ffn import ACTIVATIONS
from jax_ccfuser._fused import plan_partial_bytes
from jax_ccfuser.experimental import fused_moe_emulated
from hardening_cases import (NON_FINITE, assert_matches_reference,
                             assert_non_finite_stays_in_its_rows, assert_relu_nan_as_reference,
                             forward_and_grads, make_forward_and_grads, peer_args)
from moe_cases import Case, assert_close, emulated_plan, make_inputs, sharded

pytestmark = pytest.mark.gpu

PLATFORM = os.environ.get("CCF_CUDA_TESTS_PLATFORM", "cuda")


def _visible_devices():
  try:
    return jax.devices(PLATFORM)
  except RuntimeError:  # jax has no such backend here
    return []


_DEVICES = _visible_devices()
if not _DEVICES:
  pytest.skip(f"no {PLATFORM} device visible (CCF_CUDA_TESTS_PLATFORM=cpu runs these tests on "
              "the CPU backend)", allow_module_level=True)
if _DEVICES[0].platform != jax.devices()[0].platform:
  pytest.skip(f"{PLATFORM} is not JAX's default backend here; set JAX_PLATFORMS={PLATFORM}",
              allow_module_level=True)
if PLATFORM == "cuda" and _extension.cuda is None:
  # A GPU without the CUDA handlers is a broken build, not a reason to skip.
  raise ImportError("a CUDA device is visible but jax_ccfuser was built without its CUDA "
                    "extension (no nvcc or CUTLASS headers at build time); rebuild with "
                    "CCF_ENABLE_CUDA=ON")

# The most devices one expert-parallel group of the CUDA path takes (cuda/config.cuh kMaxPeers).
_MAX_GROUP = 8
# Every device of a shard_map group, at most a group's worth. One GPU makes a group of one: the
# handler's path for real devices, without peers; the tests that need peers say so.
_GROUP = min(len(_DEVICES), _MAX_GROUP)
_needs_peers = pytest.mark.skipif(
    _GROUP < 2, reason=f"needs peers: 2 or more {PLATFORM} devices, {len(_DEVICES)} visible")

_ACTIVATIONS = sorted(_extension.ACTIVATION_CODES)  # the native table: every activation


@pytest.fixture(autouse=True)
def _source_phases(monkeypatch):
  """The GEMMs in source phases (the fetch of later sources' rows beside them), the harder
  sequence: the handler runs them only where an expert gets 512 or more rows from each source,
  which no shape here reaches. test_source_phases_leave_results_bitwise_alike checks the other
  way, and the choice by shape, against it. Not where the environment chooses: the GPU check's
  triage reruns failed tests with the phases off."""
  if "JAX_CCFUSER_SOURCE_PHASES" not in os.environ:
    monkeypatch.setenv("JAX_CCFUSER_SOURCE_PHASES", "1")


def _reference_precision():
  """float32 products at full precision: XLA:GPU's default rounds them to TF32, further from
  the truth than the fused kernels' own float32 arithmetic."""
  return jax.default_matmul_precision("highest")


def _assert_bitwise(actual, expected):
  """Two results (pytrees of arrays) equal bit for bit."""
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, actual),
               jax.tree.map(np.asarray, expected))


def _check(out, args, activation, dtype):
  """`out = (y, grads)` against reference_moe over the global arrays (one device)."""
  with _reference_precision():
    assert_matches_reference(out, args, 1, activation, dtype)


@functools.cache
def _emulated_step(devices: int, activation: str = "swiglu", with_plan: bool = False,
                   scratch_budget: int | None = None, fetch_sms: int | None = None,
                   tf32: bool = False, residuals: str = "inputs"):
  """A jitted `(x, ids, weights, w_in, w_out, dy) -> (y, (dx, d_weights, dw_in, dw_out))` of
  `fused_moe_emulated` over `devices` emulated devices, with a fresh plan if `with_plan`, traced
  under `scratch_budget` and `fetch_sms` where given and JAX's TF32 precision if `tf32`; the
  backward recomputes h, or reads the forward's kept rows with `residuals="hidden"`."""
  def run(x, ids, weights, w_in, w_out, dy):
    plan = emulated_plan(ids, w_out.shape[0], devices) if with_plan else None
    layer = functools.partial(fused_moe_emulated, num_devices=devices, activation=activation,
                              plan=plan, residuals=residuals)
    with contextlib.ExitStack() as settings:
      if scratch_budget is not None:
        settings.enter_context(ccf.scratch_budget(scratch_budget))
      if fetch_sms is not None:
        settings.enter_context(ccf.fetch_sms(fetch_sms))
      if tf32:
        settings.enter_context(jax.default_matmul_precision("tensorfloat32"))
      y, pullback = jax.vjp(lambda x, w, a, b: layer(x, ids, w, a, b), x, weights, w_in, w_out)
      return y, pullback(dy.astype(y.dtype))

  return jax.jit(run)


def _args(case: Case, weights_in_x_dtype: bool = False):
  """`peer_args(case)`: the global arrays and a cotangent; the combine weights in x's dtype if
  asked (float32 otherwise)."""
  x, ids, weights, w_in, w_out, dy = peer_args(case)
  if weights_in_x_dtype:
    weights = weights.astype(case.dtype)
  return x, ids, weights, w_in, w_out, dy


# (test id, case, combine weights in x's dtype): D = 1, 2, 8 in every dtype, then every
# activation, K = 1 and 8, and skewed routing, each beside the defaults (swiglu, K = 2, uniform).
_EMULATED = [
    *((f"D{d}-{jnp.dtype(t).name}", Case(devices=d, dtype=t, seed=10 * d + i), False)
      for d in (1, 2, 8) for i, t in enumerate((jnp.float32, jnp.bfloat16, jnp.float16))),
    *((f"{a}-float32", Case(devices=8, activation=a, seed=40 + i), False)
      for i, a in enumerate(_ACTIVATIONS) if a != "swiglu"),
    ("gelu-bfloat16", Case(devices=2, activation="gelu", dtype=jnp.bfloat16, seed=50), False),
    ("K1", Case(devices=8, k=1, seed=51), False),
    # K = 8 over 16 experts in bfloat16 with bfloat16 combine weights.
    ("K8-bfloat16", Case(devices=8, k=8, tokens=29, dtype=jnp.bfloat16, seed=52), True),
    # K = 8 over 2 experts: every row repeats ids, and each repeat counts.
    ("K8-repeats", Case(devices=2, k=8, experts_local=1, seed=53), False),
    # Most of 8 * 70 * 2 rows on expert 0: one work list spans several 128-row tiles.
    ("skewed-float32", Case(devices=8, tokens=70, skew=1.0, seed=54), False),
    ("skewed-bfloat16", Case(devices=8, tokens=70, skew=1.0, dtype=jnp.bfloat16, seed=55), False),
    # About 300 rows of expert 0 from each of 2 sources: whole 128-row tiles of one source (run
    # in that source's phase) and tiles spanning both (the last phase).
    ("phases-bfloat16", Case(devices=2, tokens=300, skew=1.0, dtype=jnp.bfloat16, seed=56),
     False),
]


@pytest.mark.parametrize("case,weights_in_x_dtype", [c[1:] for c in _EMULATED],
                         ids=[c[0] for c in _EMULATED])
def test_emulated_matches_reference(case, weights_in_x_dtype):
  args = _args(case, weights_in_x_dtype)
  out = _emulated_step(case.devices, case.activation)(*args)
  assert out[1][1].dtype == args[2].dtype
  _check(out, args, case.activation, case.dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16],
                         ids=lambda t: jnp.dtype(t).name)
def test_every_device_matches_reference(dtype):
  case = Case(devices=_GROUP, tokens=21, k=3, dtype=dtype, seed=60)
  args = _args(case)
  out = forward_and_grads(ccf.fused_moe, _GROUP, case.activation)(*args)
  _check(out, args, case.activation, dtype)


def test_emulated_equals_every_device_bitwise():
  """D emulated peers on one device compute what D devices compute, bit for bit."""
  case = Case(devices=_GROUP, tokens=19, k=3, skew=0.5, seed=61)
  args = _args(case)
  real = forward_and_grads(ccf.fused_moe, _GROUP, case.activation)(*args)
  emulated = _emulated_step(_GROUP, case.activation)(*args)
  _assert_bitwise(emulated, real)


# Scratch budgets that hold one 128-row tile per chunk (_least_budget) and a few (1 MiB):
# skewed routing then fills many chunks, and groups cross chunk edges, so the weight gradients
# carry their sums from chunk to chunk and the scatter adds to slots already written.
_CHUNKED = [
    ("skewed-bfloat16", Case(devices=8, tokens=70, skew=1.0, dtype=jnp.bfloat16, seed=57), False),
    ("phases-float32", Case(devices=2, tokens=300, skew=1.0, seed=58), False),
    ("K8-float16", Case(devices=8, k=8, tokens=29, dtype=jnp.float16, seed=59), False),
    ("plan-bfloat16", Case(devices=2, tokens=200, skew=1.0, dtype=jnp.bfloat16, seed=66), True),
]


def _least_budget(case: Case, with_plan: bool) -> int:
  """The least scratch budget the handler takes for `case` (chunks of one M-tile): 1 byte, or on
  a GPU under a plan twice the backward's plan partials, which fused_moe refuses to take more
  than half of: E = D * E_local experts emulated, S = D slots (reassign's default), float32."""
  if not with_plan or PLATFORM != "cuda":
    return 1
  w_in, w_out = make_inputs(case)[3:]
  return 2 * plan_partial_bytes(w_in, w_out, slots=case.devices)


def _grouped_weight_gradients(case: Case, with_plan: bool = False) -> bool:
  """Whether Hopper's grouped GEMMs sum this case's weight gradients (16-bit dtypes, no plan):
  in one piece where a group's rows lie in one chunk, a chunk at a time into a float32 sum where
  they cross an edge."""
  return (PLATFORM == "cuda" and case.dtype != jnp.float32 and not with_plan
          and _extension.cuda.grouped_gemms())


def _after_other_inputs(step, args):
  """`step(*args)`, run right after `step` on other values of the same shapes (x and dy negated).
  The staging is not zeroed between calls and XLA gives a program's runs the same buffers, so a
  slot the combine reads but no chunk's scatter wrote in this call holds the other call's sums,
  which differ, rather than the right ones a run on the same inputs would have left."""
  x, ids, weights, w_in, w_out, dy = args
  jax.block_until_ready(step(-x, ids, weights, w_in, w_out, -dy))
  return step(*args)


def _assert_chunks_alike(chunked, whole, case: Case, with_plan: bool = False):
  """`(y, grads)` of a call in chunks against one chunk's: bitwise, but for the weight gradients
  where _grouped_weight_gradients (summed in another order where groups cross chunk edges:
  within the dtype's tolerance of one chunk's, which matched reference_moe)."""
  chunked, whole = (jax.tree.map(np.asarray, t) for t in (chunked, whole))
  y, (dx, d_weights, dw_in, dw_out) = chunked
  y_whole, (dx_whole, d_weights_whole, dw_in_whole, dw_out_whole) = whole
  for a, b in ((y, y_whole), (dx, dx_whole), (d_weights, d_weights_whole)):
    np.testing.assert_array_equal(a, b)
  for a, b in ((dw_in, dw_in_whole), (dw_out, dw_out_whole)):
    if _grouped_weight_gradients(case, with_plan):
      assert_close(a, b, case.dtype)
    else:
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case,with_plan", [c[1:] for c in _CHUNKED],
                         ids=[c[0] for c in _CHUNKED])
def test_emulated_chunks_equal_one_chunk_bitwise(case, with_plan):
  """However small the scratch budget, the results are bitwise those of one chunk (Hopper's
  grouped weight gradients aside, _assert_chunks_alike)."""
  args = _args(case)
  if with_plan:
    _assert_plan_has_helpers(emulated_plan(args[1], case.num_experts, case.devices))
  whole = _after_other_inputs(_emulated_step(case.devices, with_plan=with_plan), args)
  _check(whole, args, case.activation, case.dtype)
  for budget in (_least_budget(case, with_plan), 1 << 20):
    chunked = _after_other_inputs(
        _emulated_step(case.devices, with_plan=with_plan, scratch_budget=budget), args)
    _check(chunked, args, case.activation, case.dtype)
    _assert_chunks_alike(chunked, whole, case, with_plan)


def _budget_for_chunk_tiles(case: Case, tiles: int) -> int:
  """The scratch budget whose emulated backward chunks hold `tiles` M-tiles on this device, as
  the handler sizes them: its bytes grow by one tile's rows a tile, so the budget for n tiles is
  the least one past n - 1 tiles' bytes (found by bisection)."""
  sizing = functools.partial(
      _extension.cuda.scratch_bytes, case.devices, case.tokens, case.hidden, case.ffn, case.k,
      case.experts_local, ACTIVATIONS[case.activation].gated, case.dtype == jnp.float32,
      emulated=True, backward=True,
      grouped_gemms=PLATFORM == "cuda" and _extension.cuda.grouped_gemms(),
      num_sms=_sms() or 132)
  budget = sizing(scratch_budget=1)  # one tile a chunk: the least a chunk takes
  for _ in range(tiles - 1):
    fewer, enough = budget, 1 << 40
    while enough - fewer > 1:
      middle = (fewer + enough) // 2
      if sizing(scratch_budget=middle) == budget:
        fewer = middle
      else:
        enough = middle
    budget = enough
  return budget


@pytest.mark.skipif(_extension.cuda is None, reason="sizes its chunks with the CUDA handler's "
                    "own sizing: needs the CUDA extension (this build has none)")
def test_emulated_groups_carried_across_chunk_edges():
  """Weight gradients whose groups cross chunk edges, in chunks of two 128-row tiles: every
  token picks experts 0 and 2 (1 and 3 get no rows), so each of the two groups has 300 rows, three
  tiles. Chunk 1 (tiles 2, 3) ends group 0, steps over the empty group 1 and begins group 2, which
  goes on into chunk 2: the carry is read, finished and rewritten in one chunk (Hopper:
  CarryGemm's continued part, finish_carry, its begun part), at a row offset inside the chunk.
  H = 136 and F = 200 span several tiles of every weight gradient, and the empty groups' zeros
  are written by expert_gemm stepping over the groups with rows."""
  case = Case(devices=2, tokens=150, k=2, experts_local=2, hidden=136, ffn=200,
              dtype=jnp.bfloat16, seed=76)
  x, ids, weights, w_in, w_out, dy = _args(case)
  flipped = np.random.default_rng(case.seed).random(ids.shape[0]) < 0.5
  ids = jnp.asarray(np.where(flipped[:, None], [2, 0], [0, 2]), jnp.int32)
  assert np.bincount(np.asarray(ids).ravel(), minlength=4).tolist() == [300, 0, 300, 0]
  args = (x, ids, weights, w_in, w_out, dy)
  budget = _budget_for_chunk_tiles(case, 2)
  assert budget > _budget_for_chunk_tiles(case, 1)
  whole = _after_other_inputs(_emulated_step(case.devices), args)
  chunked = _after_other_inputs(_emulated_step(case.devices, scratch_budget=budget), args)
  _check(chunked, args, case.activation, case.dtype)
  _assert_chunks_alike(chunked, whole, case)
  _, (_, _, dw_in, dw_out) = chunked
  assert not np.asarray(dw_in)[[1, 3]].any() and not np.asarray(dw_out)[[1, 3]].any()


# The forward keeps each pair's h (`residuals="hidden"`; GEMM1's epilogue or pass writes it) and
# the backward reads it instead of recomputing x @ w_in: gated and not, 16-bit and float32, in one
# chunk and in chunks of one tile.
_KEPT = [
    ("D8-bfloat16", Case(devices=8, tokens=70, skew=1.0, dtype=jnp.bfloat16, seed=67), None),
    ("D2-gelu-float32", Case(devices=2, activation="gelu", seed=68), None),
    ("chunked-float16", Case(devices=8, k=8, tokens=29, dtype=jnp.float16, seed=69), 1),
]


@pytest.mark.parametrize("case,budget", [c[1:] for c in _KEPT], ids=[c[0] for c in _KEPT])
def test_emulated_kept_hidden_equals_recomputing_bitwise(case, budget):
  args = _args(case)
  kept = _after_other_inputs(_emulated_step(case.devices, case.activation, scratch_budget=budget,
                                            residuals="hidden"), args)
  _check(kept, args, case.activation, case.dtype)
  recomputed = _after_other_inputs(
      _emulated_step(case.devices, case.activation, scratch_budget=budget), args)
  _assert_bitwise(kept, recomputed)


def test_every_device_chunks_equal_one_chunk_bitwise():
  case = Case(devices=_GROUP, tokens=150, k=3, skew=1.0, dtype=jnp.bfloat16, seed=67)
  args = _args(case)
  whole = forward_and_grads(ccf.fused_moe, _GROUP, case.activation)(*args)
  with ccf.scratch_budget(1):
    chunked = make_forward_and_grads(ccf.fused_moe, _GROUP, case.activation)(*args)
  _check(chunked, args, case.activation, case.dtype)
  _assert_chunks_alike(chunked, whole, case)


def _sms() -> int | None:
  """The first device's SMs; None on the CPU backend."""
  return getattr(_DEVICES[0], "core_count", None) if PLATFORM == "cuda" else None


@pytest.mark.parametrize("case", [_CHUNKED[0][1], _CHUNKED[1][1]], ids=["D8", "D2"])
def test_fetch_sms_leave_results_bitwise_alike(case):
  """The GEMMs' SMs while rows are fetched beside them (none kept for the fetch, the default one
  in eight, all but one) change where tiles run, never what they sum."""
  args = _args(case)
  default = jax.tree.map(np.asarray, _emulated_step(case.devices)(*args))
  _check(default, args, case.activation, case.dtype)
  for count in (0, (_sms() or 2) - 1):
    other = _emulated_step(case.devices, fetch_sms=count)(*args)
    _assert_bitwise(other, default)


@pytest.mark.skipif(PLATFORM != "cuda", reason="the CPU handler runs no source phases")
@pytest.mark.parametrize("case", [_CHUNKED[0][1], _CHUNKED[1][1], _CHUNKED[3][1]],
                         ids=["D8", "D2", "D2-plan"])
def test_source_phases_leave_results_bitwise_alike(case, monkeypatch):
  """GEMMs in phases by the source of their rows, in one phase after every source's rows are in
  (JAX_CCFUSER_SOURCE_PHASES=0), or as the shape decides (none here): the same bits, in one
  chunk and in chunks of one tile."""
  with_plan = case is _CHUNKED[3][1]
  args = _args(case)
  phases = jax.tree.map(np.asarray, _emulated_step(case.devices, with_plan=with_plan)(*args))
  _check(phases, args, case.activation, case.dtype)
  least = _least_budget(case, with_plan)
  chunked = _emulated_step(case.devices, with_plan=with_plan, scratch_budget=least)(*args)
  _assert_chunks_alike(chunked, phases, case, with_plan)
  for asked in ("0", ""):
    monkeypatch.setenv("JAX_CCFUSER_SOURCE_PHASES", asked)
    for budget, same_chunks in ((None, phases), (least, chunked)):
      other = _emulated_step(case.devices, with_plan=with_plan, scratch_budget=budget)(*args)
      _assert_bitwise(other, same_chunks)


@pytest.mark.skipif(PLATFORM != "cuda", reason="the CPU backend has no SMs to keep")
def test_fetch_sms_must_leave_the_gemms_an_sm():
  args = _args(Case(devices=2, seed=68))
  with pytest.raises(ValueError, match=rf"fetch_sms\({_sms()}\) leaves none of this GPU's"):
    _emulated_step(2, fetch_sms=_sms())(*args)


# float32 under JAX's TF32 precision, the opt-in: D = 8 with skewed routing over many tiles, and
# D = 2 in source phases with an ungated activation.
_TF32 = [("D8-skewed", Case(devices=8, tokens=70, skew=1.0, seed=69)),
         ("D2-phases-gelu", Case(devices=2, tokens=300, skew=1.0, activation="gelu", seed=70))]


@pytest.mark.parametrize("case", [c[1] for c in _TF32], ids=[c[0] for c in _TF32])
def test_tf32_matches_reference_within_its_rounding(case):
  """TF32 keeps 10 mantissa bits of each operand, as float16 does: float16's tolerances. On a
  GPU its results are not exact float32's (the opt-in took effect); chunks keep them bitwise."""
  args = _args(case)
  tf32 = jax.tree.map(np.asarray,
                      _emulated_step(case.devices, case.activation, tf32=True)(*args))
  with _reference_precision():
    assert_matches_reference(tf32, args, 1, case.activation, jnp.float16)
  if PLATFORM == "cuda":
    exact = _emulated_step(case.devices, case.activation)(*args)
    assert not np.array_equal(tf32[0], np.asarray(exact[0]))
  chunked = _emulated_step(case.devices, case.activation, scratch_budget=1, tf32=True)(*args)
  _assert_bitwise(chunked, tf32)


def test_rows_that_take_no_vectors_stay_exact():
  """H = 18 is no multiple of 4: the scatter and the combine move one column a lane (the only
  float32 shape that makes them, 16-bit needing H % 8), in one chunk and in chunks of one tile,
  and TF32's 16-byte vectors do not fit the rows, so the call computes exact float32, bitwise."""
  case = Case(devices=2, hidden=18, seed=71)
  args = _args(case)
  exact = jax.tree.map(np.asarray, _after_other_inputs(_emulated_step(2), args))
  _check(exact, args, case.activation, case.dtype)
  _assert_bitwise(_after_other_inputs(_emulated_step(2, scratch_budget=1), args), exact)
  _assert_bitwise(_emulated_step(2, tf32=True)(*args), exact)


def _assert_plan_has_helpers(plan):
  """The plan moves rows to helpers: otherwise a test with it checks nothing new."""
  assert np.any(np.asarray(plan.workers)[:, 1:] >= 0), plan.workers


@pytest.mark.parametrize("devices,dtype", [(8, jnp.float32), (2, jnp.bfloat16)],
                         ids=["D8-float32", "D2-bfloat16"])
def test_emulated_with_plan_matches_reference(devices, dtype):
  case = Case(devices=devices, tokens=40, skew=1.0, dtype=dtype, seed=62)
  args = _args(case)
  _assert_plan_has_helpers(emulated_plan(args[1], case.num_experts, devices))
  out = _emulated_step(devices, case.activation, with_plan=True)(*args)
  _check(out, args, case.activation, dtype)


@_needs_peers
def test_every_device_with_plan_matches_reference():
  case = Case(devices=_GROUP, tokens=40, skew=1.0, seed=63)
  args = _args(case)
  _assert_plan_has_helpers(emulated_plan(args[1], case.num_experts, _GROUP))
  out = forward_and_grads(ccf.fused_moe, _GROUP, case.activation, True)(*args)
  _check(out, args, case.activation, case.dtype)


@pytest.mark.parametrize("devices,with_plan,chunked", [(8, False, False), (2, True, True)],
                         ids=["D8", "D2-plan-chunked"])
def test_emulated_frozen_experts_keep_dx_and_d_weights_bitwise(devices, with_plan, chunked):
  """A backward wanting no gradient of w_in or w_out (frozen experts) skips their GEMMs; dx
  and d expert_weights are bitwise the full backward's. Chunked, it runs in chunks of one M-tile
  (it keeps no plan partials, which the full backward's least budget holds)."""
  case = Case(devices=devices, tokens=40, skew=0.7, dtype=jnp.bfloat16, seed=64)
  args = _args(case)
  budget = _least_budget(case, with_plan) if chunked else None
  if with_plan:
    _assert_plan_has_helpers(emulated_plan(args[1], case.num_experts, devices))

  @jax.jit
  def frozen(x, ids, weights, w_in, w_out, dy):
    plan = emulated_plan(ids, w_out.shape[0], devices) if with_plan else None
    layer = functools.partial(fused_moe_emulated, num_devices=devices,
                              activation=case.activation, plan=plan)
    with contextlib.ExitStack() as settings:
      if chunked:
        settings.enter_context(ccf.scratch_budget(1))
      y, pullback = jax.vjp(lambda x, w: layer(x, ids, w, w_in, w_out), x, weights)
      return y, pullback(dy.astype(y.dtype))

  y, (dx, d_weights, _, _) = _emulated_step(devices, case.activation, with_plan=with_plan,
                                            scratch_budget=budget)(*args)
  _assert_bitwise(frozen(*args), (y, (dx, d_weights)))


def _assert_bitwise_repeatable(step, args, runs=4):
  first = jax.tree.map(np.asarray, step(*args))
  for _ in range(runs - 1):
    _assert_bitwise(step(*args), first)


def test_emulated_deterministic_bitwise():
  case = Case(devices=8, tokens=40, k=4, skew=0.7, dtype=jnp.bfloat16, seed=64)
  _assert_bitwise_repeatable(_emulated_step(8), _args(case))


def test_every_device_deterministic_bitwise():
  case = Case(devices=_GROUP, tokens=40, k=4, skew=0.7, dtype=jnp.bfloat16, seed=65)
  _assert_bitwise_repeatable(forward_and_grads(ccf.fused_moe, _GROUP, case.activation),
                             _args(case))


def _assert_bad_id_reported(layer, args, bad_args, row, message):
  """A call with a bad expert id raises `message`; the calls after it run as before.

  The CPU path raises from the call itself. The CUDA path records the fault on the device and
  reports it from a later call on that GPU, once the faulty call's work has finished
  (xla_ffi/cuda/moe_cuda.cc): the faulty call's outputs for the token are NaN and the next call
  raises. Either way the fault is reported once, and the call after it is right.
  """
  try:
    y_bad = jax.block_until_ready(layer(*bad_args))
  except jax.errors.JaxRuntimeError as e:
    assert re.search(message, str(e)), str(e)
  else:
    assert np.all(np.isnan(np.asarray(y_bad[row], np.float32))), y_bad[row]
    with pytest.raises(jax.errors.JaxRuntimeError, match=message):
      jax.block_until_ready(layer(*args))
  y = layer(*args)
  with _reference_precision():
    assert_close(y, ccf.reference_moe(*args), jnp.float32)


def _bad_id_message(token, k, bad, device, num_experts):
  return re.escape(f"expert_ids[{token}, {k}] = {bad} on device {device} is outside "
                   f"[0, {num_experts})")


@pytest.mark.parametrize("bad", ["E", "-1"])
def test_emulated_out_of_range_id_raises(bad):
  case = Case(devices=2, seed=66)
  args = make_inputs(case)
  value = case.num_experts if bad == "E" else -1
  row = case.tokens + 5  # emulated device 1, token 5
  bad_args = (args[0], args[1].at[row, 1].set(value), *args[2:])
  layer = jax.jit(functools.partial(fused_moe_emulated, num_devices=2))
  _assert_bad_id_reported(layer, args, bad_args, row,
                          _bad_id_message(5, 1, value, 1, case.num_experts))


def test_every_device_out_of_range_id_raises():
  case = Case(devices=_GROUP, seed=67)
  args = make_inputs(case)
  device = _GROUP - 1
  row = device * case.tokens + 3
  bad_args = (args[0], args[1].at[row, 0].set(1000), *args[2:])
  _assert_bad_id_reported(sharded(ccf.fused_moe, _GROUP), args, bad_args, row,
                          _bad_id_message(3, 0, 1000, device, case.num_experts))


@pytest.mark.parametrize("where,value", NON_FINITE)
@pytest.mark.parametrize("dtype,budget", [(jnp.float32, None), (jnp.bfloat16, 1)],
                         ids=["float32", "bfloat16-chunked"])
def test_emulated_non_finite_token_stays_in_its_rows(where, value, dtype, budget):
  """As tests/test_non_finite.py on the CPU path: a token's NaN/Inf reaches its own rows and its
  experts' weight gradients only, also where those sums cross chunk edges."""
  case = Case(devices=4, tokens=16, k=2, skew=0.5, dtype=dtype, seed=75)
  assert_non_finite_stays_in_its_rows(_emulated_step(case.devices, scratch_budget=budget), case,
                                      where, value)


def test_emulated_relu_passes_no_gradient_through_its_flat_side_even_a_nan():
  """As tests/test_non_finite.py's relu test on the CPU path (ActBackward in
  common/activation.h)."""
  def reference(*args):
    with _reference_precision():
      return forward_and_grads(ccf.reference_moe, 1, "relu")(*args)

  assert_relu_nan_as_reference(_emulated_step(4, "relu"), reference,
                               Case(devices=4, tokens=16, k=2, activation="relu", seed=53))


def _input_sets(case: Case, count: int = 4):
  """`count` problems of one shape with their own routing and values: a call that read another
  call's rows or staging would give another set's result."""
  return [make_inputs(dataclasses.replace(case, seed=case.seed + i)) for i in range(count)]


def _checked_first_results(layer, sets):
  """Each set's first result, checked against reference_moe."""
  firsts = [np.asarray(layer(*args)) for args in sets]
  with _reference_precision():
    for y, args in zip(firsts, sets):
      assert_close(y, ccf.reference_moe(*args), jnp.float32)
  return firsts


def _emulated_forward(devices):
  """A fresh jitted forward: each is traced on its own, so each is its own call site."""
  return jax.jit(functools.partial(fused_moe_emulated, num_devices=devices))


def _forward_sites(emulated: bool):
  """Two call sites of one shape: emulated over 8 peers, or over every device."""
  if emulated:
    return _emulated_forward(8), _emulated_forward(8), 8
  return sharded(ccf.fused_moe, _GROUP), sharded(ccf.fused_moe, _GROUP), _GROUP


_EMULATED_OR_EVERY_DEVICE = pytest.mark.parametrize(
    "emulated", [True, False],
    ids=["emulated", "every-device"])


def _assert_repeats(site, sets, firsts, *, calls):
  """`calls` more calls of `site` over the input sets in turn, each bitwise its first result."""
  for i in range(calls):
    np.testing.assert_array_equal(np.asarray(site(*sets[i % len(sets)])), firsts[i % len(sets)],
                                  f"call {i}")


@_needs_peers
def test_failed_call_leaves_the_group_in_step():
  """A device whose call fails after the group met (an injected fault on rank 1): every device
  returns that error and none enqueues its barriers, so the device barriers' counts stay equal
  and the following calls are right."""
  site, _, devices = _forward_sites(emulated=False)
  sets = _input_sets(Case(devices=devices, tokens=24, seed=72))
  firsts = _checked_first_results(site, sets)
  native = _extension.cuda if PLATFORM == "cuda" else _extension.cpu
  native.fail_next_call_for_testing(1)
  with pytest.raises(jax.errors.JaxRuntimeError, match="injected fault on device 1"):
    jax.block_until_ready(site(*sets[0]))
  _assert_repeats(site, sets, firsts, calls=20)


@_EMULATED_OR_EVERY_DEVICE
def test_one_site_hundred_calls(emulated):
  site, _, devices = _forward_sites(emulated)
  sets = _input_sets(Case(devices=devices, tokens=24, seed=70))
  firsts = _checked_first_results(site, sets)
  _assert_repeats(site, sets, firsts, calls=100)


@_EMULATED_OR_EVERY_DEVICE
def test_two_sites_alternating(emulated):
  site_a, site_b, devices = _forward_sites(emulated)
  sets = _input_sets(Case(devices=devices, tokens=24, seed=71))
  sites = (site_a, site_b)
  firsts = [_checked_first_results(site, sets) for site in sites]
  for i in range(100):
    np.testing.assert_array_equal(np.asarray(sites[i % 2](*sets[i % 4])), firsts[i % 2][i % 4],
                                  f"call {i}")


@_EMULATED_OR_EVERY_DEVICE
def test_two_hundred_calls_queued_then_one_wait(emulated):
  site, _, devices = _forward_sites(emulated)
  sets = _input_sets(Case(devices=devices, tokens=24, seed=72))
  firsts = _checked_first_results(site, sets)
  queued = [site(*sets[i % 4]) for i in range(200)]  # dispatched back to back, nothing waits
  jax.block_until_ready(queued)
  for i, y in enumerate(queued):
    np.testing.assert_array_equal(np.asarray(y), firsts[i % 4], f"call {i}")


# T=37, H=136, F=200: a multiple of no tile (bfloat16 and float16 need H and F multiples of 8).
_ODD = Case(tokens=37, hidden=136, ffn=200, experts_local=3, k=3)


@pytest.mark.parametrize("devices,dtype", [(2, jnp.float32), (2, jnp.bfloat16),
                                           (8, jnp.float16)],
                         ids=["D2-float32", "D2-bfloat16", "D8-float16"])
def test_emulated_shape_off_every_tile(devices, dtype):
  case = dataclasses.replace(_ODD, devices=devices, dtype=dtype, seed=73)
  args = _args(case)
  _check(_emulated_step(devices, case.activation)(*args), args, case.activation, dtype)


def test_every_device_shape_off_every_tile():
  case = dataclasses.replace(_ODD, devices=_GROUP, dtype=jnp.bfloat16, seed=74)
  args = _args(case)
  out = forward_and_grads(ccf.fused_moe, _GROUP, case.activation)(*args)
  _check(out, args, case.activation, case.dtype)


def test_hopper_runs_grouped_gemms():
  """Where the sm_90a code can run, the calls use it: the tests here then check the grouped
  GEMMs, not a silent fallback to the SM80 kernels."""
  if PLATFORM != "cuda" or not re.search(r"H100|H200|H800|H20\b", _DEVICES[0].device_kind):
    pytest.skip(f"not a Hopper GPU: {_DEVICES[0].device_kind}")
  assert os.environ.get("JAX_CCFUSER_GROUPED_GEMMS") != "0"
  assert _extension.cuda.grouped_gemms()


# The SM80 kernels on a GPU that runs the grouped GEMMs (Hopper): a fresh process that turns the
# grouped GEMMs off (JAX_CCFUSER_GROUPED_GEMMS=0, read when a GPU is first used) computes the same
# case, and both sides match reference_moe and each other to twice bfloat16's tolerance.
_SM80_SCRIPT = """
import sys
import jax, numpy as np
jax.config.update("jax_num_cpu_devices", 8)  # as tests/conftest.py
import jax_ccfuser  # noqa: F401 (sizes the CPU thread pool before the backends start)
sys.path.insert(0, sys.argv[1])
import test_cuda
case = test_cuda.Case(devices=8, tokens=70, skew=1.0, dtype=test_cuda.jnp.bfloat16, seed=75)
out = test_cuda._emulated_step(8)(*test_cuda._args(case))
np.savez(sys.argv[2], *[np.asarray(a, np.float32) for a in jax.tree.leaves(out)])
"""


def test_emulated_sm80_kernels_match_grouped_gemms(tmp_path):
  case = Case(devices=8, tokens=70, skew=1.0, dtype=jnp.bfloat16, seed=75)
  args = _args(case)
  grouped = _emulated_step(8)(*args)
  _check(grouped, args, case.activation, case.dtype)
  # The child shares the GPU with this process, which may hold XLA's preallocated share of it.
  env = {**os.environ, "JAX_CCFUSER_GROUPED_GEMMS": "0", "CCF_CUDA_TESTS_PLATFORM": PLATFORM,
         "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  if PLATFORM == "cpu":
    env["JAX_PLATFORMS"] = "cpu"
  out = tmp_path / "sm80.npz"
  subprocess.run([sys.executable, "-c", _SM80_SCRIPT, str(pathlib.Path(__file__).parent),
                  str(out)], env=env, check=True, timeout=600)
  with np.load(out) as saved:
    sm80 = [saved[f"arr_{i}"] for i in range(len(saved.files))]
  leaves = jax.tree.leaves(grouped)
  assert len(sm80) == len(leaves)
  for a, b in zip(sm80, leaves):
    assert_close(a, np.asarray(b, np.float32), case.dtype, scale=2.0)
