"""The call contract between `fused_moe`'s Python side and its native handlers.

The attributes and the activation codes are defined natively (xla_ffi/moe_call.h's
CCF_CALL_ATTRS, common/activation.h); Python's attribute record and activation names must be
exactly those, in both native modules.
"""

import functools
import re
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ccfuser as ccf
from jax_ccfuser import _extension, _fused
from jax_ccfuser._ffn import ACTIVATIONS

NATIVE = [m for m in (_extension.cpu, _extension.cuda) if m is not None]


@pytest.mark.parametrize("module", NATIVE, ids=lambda m: m.__name__)
def test_python_attribute_record_is_the_natives(module):
  native = module.call_attributes()
  assert list(native) == list(_fused._CallAttrs._fields)
  assert native == {
      "site": "uint64", "num_devices": "int32", "emulated": "int32", "activation": "int32",
      "timeout_ms": "int64", "num_experts": "int64", "workspace": "int32",
      "workspace_offset": "int64", "devices": "int32[]", "scratch_budget": "int64",
      "fetch_sms": "int32", "tf32": "int32", "kept_rows": "int64", "weight_grads": "int32"}


@pytest.mark.parametrize("module", NATIVE, ids=lambda m: m.__name__)
def test_activation_codes_are_the_natives(module):
  codes = module.activation_codes()
  assert codes == _extension.ACTIVATION_CODES
  assert set(codes) == set(ACTIVATIONS)
  assert sorted(codes.values()) == list(range(len(codes)))


def test_attributes_are_typed_as_declared():
  static = _fused._Static(site=7, num_devices=2, emulated=True, activation="geglu",
                          timeout_ms=1234, num_experts=8, scratch_budget=5 << 30,
                          fetch_sms=20, tf32=True)
  attrs = _fused._call_attrs(static, True, (-1, 0), 13, weight_grads=True)
  ffi = attrs.as_ffi()
  assert list(ffi) == list(_extension.CALL_ATTRIBUTES)
  for name, kind in _extension.CALL_ATTRIBUTES.items():
    assert ffi[name].dtype == np.dtype(kind.removesuffix("[]")), name
    assert np.ndim(ffi[name]) == kind.endswith("[]"), name
  assert ffi["site"] == 15 and ffi["activation"] == _extension.ACTIVATION_CODES["geglu"]
  assert (ffi["workspace"], ffi["workspace_offset"]) == (-1, 0)
  assert ffi["devices"].tolist() == [-1]
  assert ffi["scratch_budget"] == 5 << 30
  assert ffi["fetch_sms"] == 20
  assert ffi["tf32"] == 1
  assert ffi["kept_rows"] == 13
  assert ffi["weight_grads"] == 1


def _static_traced_now():
  """The `_Static` of a call traced now: the settings in force become its fields."""
  return _fused._Static(site=1, num_devices=1, emulated=False, activation="relu",
                        num_experts=1, **_fused._traced_settings())


def test_scratch_budget_is_fixed_at_trace_time():
  static = _static_traced_now
  default = static().scratch_budget
  with ccf.scratch_budget(1 << 20):
    assert static().scratch_budget == 1 << 20
    with ccf.scratch_budget(3):
      assert static().scratch_budget == 3
    assert static().scratch_budget == 1 << 20
  assert static().scratch_budget == default == 2 << 30
  for bad in (0, -1, 0.5, float("nan"), 2**63):
    with pytest.raises(ValueError, match="scratch_budget must be a whole number of bytes > 0"):
      ccf.scratch_budget(bad)


def test_peer_timeout_is_fixed_at_trace_time():
  static = _static_traced_now
  assert static().timeout_ms == round(1000 * ccf._config._DEFAULTS["seconds"])  # 300 s unset
  with ccf.peer_timeout(2.5):
    assert static().timeout_ms == 2500
  # Endless waits are hangs, and the handlers count nanoseconds in int64.
  for bad in (0, -1, float("nan"), float("inf"), 1e10):
    with pytest.raises(ValueError, match="peer_timeout must be positive and at most 1e"):
      ccf.peer_timeout(bad)


def test_environment_settings_are_checked_as_the_settings_are():
  defaults = ccf._config.process_defaults
  assert defaults({}) == {"seconds": 300.0, "transport": "auto", "residual_bytes": 256 << 20,
                          "scratch_bytes": 2 << 30, "fetch_sms": ccf._config.AUTO_FETCH_SMS}
  assert defaults({"JAX_CCFUSER_PEER_TIMEOUT": "2.5", "JAX_CCFUSER_TRANSPORT": "collectives",
                   "JAX_CCFUSER_RESIDUAL_BUDGET": "0", "JAX_CCFUSER_SCRATCH_BUDGET": "1e9",
                   "JAX_CCFUSER_FETCH_SMS": "24", "OTHER": "x"}) == {
      "seconds": 2.5, "transport": "collectives", "residual_bytes": 0,
      "scratch_bytes": 10**9, "fetch_sms": 24}
  for auto in ("auto", "-1"):  # -1: the value the variable took before it was checked
    assert defaults({"JAX_CCFUSER_FETCH_SMS": auto})["fetch_sms"] == ccf._config.AUTO_FETCH_SMS
  for variable, value, why in [
      ("JAX_CCFUSER_PEER_TIMEOUT", "inf", "peer_timeout must be positive"),
      ("JAX_CCFUSER_PEER_TIMEOUT", "5s", "could not convert"),
      ("JAX_CCFUSER_TRANSPORT", "nvlink", "transport must be one of"),
      ("JAX_CCFUSER_RESIDUAL_BUDGET", "-1", "residual_budget must be a whole number"),
      ("JAX_CCFUSER_SCRATCH_BUDGET", "0.5", "scratch_budget must be a whole number"),
      ("JAX_CCFUSER_SCRATCH_BUDGET", "2GiB", "could not convert"),
      ("JAX_CCFUSER_SCRATCH_BUDGET", "1e300", "scratch_budget must be a whole number"),
      ("JAX_CCFUSER_FETCH_SMS", "-2", "fetch_sms must be a whole number >= 0"),
      ("JAX_CCFUSER_FETCH_SMS", "1e12", "fetch_sms must be a whole number >= 0"),
      ("JAX_CCFUSER_FETCH_SMS", "nan", "fetch_sms must be a whole number >= 0")]:
    with pytest.raises(ValueError, match=f"environment variable {variable}='{value}' is not a "
                                         f"valid setting: {why}"):
      defaults({variable: value})


def test_fetch_sms_are_fixed_at_trace_time():
  static = _static_traced_now
  auto = ccf._config.AUTO_FETCH_SMS  # the handler's one SM in eight
  assert static().fetch_sms == auto == -1
  with ccf.fetch_sms(0):
    assert static().fetch_sms == 0
    with ccf.fetch_sms(24):
      assert static().fetch_sms == 24
      with ccf.fetch_sms(None):
        assert static().fetch_sms == auto
    assert static().fetch_sms == 0
  assert static().fetch_sms == auto
  for bad in (-1, 0.5, float("nan"), 2**31):
    with pytest.raises(ValueError, match="fetch_sms must be a whole number >= 0 or None"):
      ccf.fetch_sms(bad)


def _lowered_attribute(fn, name, *args) -> int:
  """The value of the custom call attribute `name` in `fn` (jitted) lowered for `args`."""
  return int(re.search(rf"{name} = (\d+)", fn.lower(*args).as_text())[1])


def test_settings_are_keys_of_jit_caches_as_jaxs_own_are():
  """A jitted function called under another value traces again, with that value, and under an
  earlier value again hits that trace; the settings are thread-local, re-enterable, nestable and
  decorate functions, as `jax.default_matmul_precision` does."""
  x = jax.random.normal(jax.random.key(0), (8, 16))
  ids, weights, _ = ccf.route(x[:, :4], 2)
  w_in, w_out = jnp.ones((4, 16, 64)) / 16, jnp.ones((4, 32, 16)) / 32
  traces = []

  @jax.jit
  def step(x):
    traces.append(ccf._config.peer_timeout_ms())
    return ccf.fused_moe(x, ids, weights, w_in, w_out)

  expected = np.asarray(step(x))
  short = ccf.peer_timeout(2.0)
  for _ in range(2):  # entered again: the trace made under it is hit
    with short:
      np.testing.assert_array_equal(step(x), expected)
  with short:
    with ccf.peer_timeout(3.0):
      with short:
        assert _lowered_attribute(step, "timeout_ms", x) == 2000
      assert _lowered_attribute(step, "timeout_ms", x) == 3000
    assert _lowered_attribute(step, "timeout_ms", x) == 2000
  default = round(1000 * ccf._config._DEFAULTS["seconds"])  # 300 s unless the environment says
  assert traces == [default, 2000, 3000]  # one trace per value
  with ccf.residual_budget(0):
    assert _lowered_attribute(step, "kept_rows", x) == 0
  assert ccf.scratch_budget(1 << 20)(lambda: ccf._config.scratch_budget_bytes())() == 1 << 20

  seen = {}

  def in_thread(seconds):
    with ccf.peer_timeout(seconds):
      time.sleep(0.05)  # while the other thread's block is open too
      seen[seconds] = ccf._config.peer_timeout_ms()

  threads = [threading.Thread(target=in_thread, args=(s,)) for s in (4.0, 5.0)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert seen == {4.0: 4000, 5.0: 5000} and ccf._config.peer_timeout_ms() == default


@pytest.mark.parametrize("setting, bad", [
    (ccf.peer_timeout, True), (ccf.peer_timeout, "5"), (ccf.peer_timeout, None),
    (ccf.residual_budget, True), (ccf.scratch_budget, "1GiB"), (ccf.fetch_sms, False)])
def test_settings_refuse_values_of_another_type_by_name(setting, bad):
  with pytest.raises(TypeError, match=rf"{setting.__name__} takes a number of .*got {bad!r}"):
    setting(bad)


def test_settings_print_as_they_were_made():
  shown = [repr(s) for s in (ccf.peer_timeout(5.0), ccf.transport("collectives"),
                             ccf.residual_budget(1 << 20), ccf.scratch_budget(2**30),
                             ccf.fetch_sms(None))]
  assert shown == ["jax_ccfuser.peer_timeout(5.0)", "jax_ccfuser.transport('collectives')",
                   "jax_ccfuser.residual_budget(1048576)",
                   "jax_ccfuser.scratch_budget(1073741824)", "jax_ccfuser.fetch_sms(None)"]


def test_tf32_follows_jax_default_matmul_precision_at_trace_time():
  static = _static_traced_now
  assert not static().tf32  # exact float32 unless asked
  for precision in ccf._config.TF32_PRECISIONS:
    with jax.default_matmul_precision(precision):
      assert static().tf32, precision
  for precision in ("float32", "highest", "F32_F32_F32", "TF32_TF32_F32_X3"):
    with jax.default_matmul_precision(precision):
      assert not static().tf32, precision
  with jax.default_matmul_precision("tensorfloat32"):
    attrs = _fused._call_attrs(static(), False, (-1, 0), 0).as_ffi()
  assert attrs["tf32"] == 1


def test_fetch_sms_must_leave_a_gpu_an_sm(monkeypatch):
  """Traced for a GPU (faked here: the check needs only its platform and SM count)."""
  gpu = type("Gpu", (), {"core_count": 132})()
  monkeypatch.setattr(_fused._topology, "platform", lambda: "gpu")
  monkeypatch.setattr(_fused.jax, "local_devices", lambda: [gpu])
  with ccf.fetch_sms(131):
    assert _static_traced_now().fetch_sms == 131
  assert _static_traced_now().fetch_sms == ccf._config.AUTO_FETCH_SMS  # the handler's choice
  with ccf.fetch_sms(132), pytest.raises(ValueError, match=r"fetch_sms\(132\) leaves none of "
                                                           r"this GPU's 132 SMs"):
    _static_traced_now()


# A DeepSeek-V3-sized layer emulated as 8 devices on one GPU (T=1024 each, K=8) and one device
# of a real group of 8 (T=4096): every pair of the group on the device is 65,536 and 262,144 rows.
_SIZES = [dict(num_devices=8, tokens=1024, hidden=7168, ffn=2048, k=8, experts_local=32,
               gated=True, float32=False, emulated=True),
          dict(num_devices=8, tokens=4096, hidden=7168, ffn=2048, k=8, experts_local=32,
               gated=True, float32=False, emulated=False)]


@pytest.mark.skipif(_extension.cuda is None, reason="built without the CUDA extension")
@pytest.mark.parametrize("sizes", _SIZES, ids=["emulated", "one-of-8"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_gpu_scratch_stays_within_its_budget(sizes, backward):
  """The CUDA handler's scratch (host-side sizing, no GPU needed): the worst case where it fits
  the budget, else chunks that fit it; a budget below one tile's rows still gets one tile."""
  scratch = functools.partial(_extension.cuda.scratch_bytes, **sizes, backward=backward)
  worst = scratch(scratch_budget=1 << 50)
  assert scratch(scratch_budget=worst) == worst
  smallest = scratch(scratch_budget=1)
  assert smallest < worst // 10
  for budget in (worst - 1, worst // 3, 2 << 30, 512 << 20, smallest + 1):
    if budget >= smallest:
      assert smallest <= scratch(scratch_budget=budget) <= budget, budget
  # Hopper's grouped GEMMs add float32 rows (h, or u) and their workspace, within the budget.
  grouped = functools.partial(scratch, grouped_gemms=True, num_sms=132)
  assert grouped(scratch_budget=1 << 50) > worst
  assert smallest <= grouped(scratch_budget=1 << 30) <= 1 << 30
  # More budget never means fewer bytes.
  budgets = sorted({smallest, 256 << 20, 1 << 30, 4 << 30, worst})
  taken = [scratch(scratch_budget=b) for b in budgets]
  assert taken == sorted(taken)



@pytest.mark.skipif(_extension.cuda is None, reason="built without the CUDA extension")
@pytest.mark.parametrize("sizes", _SIZES, ids=["emulated", "one-of-8"])
def test_gpu_frozen_backward_takes_no_weight_gradient_scratch(sizes):
  """A backward without the expert weights' gradients (frozen experts) carves neither the w*a
  rows `[rows, F]` nor, in chunks, the float32 carry `H*2F + F*H`: fewer bytes whole, and more
  rows a chunk under the budget that holds one tile of the full backward."""
  full = functools.partial(_extension.cuda.scratch_bytes, **sizes, backward=True)
  frozen = functools.partial(full, weight_grads=False)
  pairs = sizes["num_devices"] * sizes["tokens"] * sizes["k"]
  width = 4 if sizes["float32"] else 2
  whole = 1 << 50
  assert full(scratch_budget=whole) - frozen(scratch_budget=whole) >= pairs * sizes["ffn"] * width
  carry = 3 * sizes["hidden"] * sizes["ffn"] * 4
  assert full(scratch_budget=1) - frozen(scratch_budget=1) > carry
  one_full_tile = full(scratch_budget=1)
  assert frozen(scratch_budget=1) < frozen(scratch_budget=one_full_tile) <= one_full_tile

def test_no_region_without_peers_in_other_processes():
  # Peers in this process meet in the registry: nothing is reserved, nothing waits.
  static = _fused._Static(site=1, num_devices=4, emulated=False, activation="swiglu",
                          timeout_ms=1000, num_experts=8)
  assert _fused._reserve_region(static, False, None, None, None, None, None) == (-1, 0)


def _forward_by_hand(*, weights_dtype=jnp.float32, hidden_shape=(1, 6), kept_rows=0,
                     staging_shape=(4, 1, 8)):
  """A one-device "ccf_moe_fwd" call made by hand (x [4, 8], K=2, two swiglu experts of F=3):
  `(call, operands, attributes)`."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, 2, (4, 2)), jnp.int32)
  weights = jnp.asarray(rng.random((4, 2)), weights_dtype)
  w_in = jnp.asarray(rng.standard_normal((2, 8, 6)), jnp.float32)
  w_out = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32)
  workers, bounds = _fused._plan_operands(None, 2, 1)
  static = _fused._Static(site=next(_fused._sites), num_devices=1, emulated=False,
                          activation="swiglu", timeout_ms=1000, num_experts=2)
  call = jax.ffi.ffi_call("ccf_moe_fwd", (jax.ShapeDtypeStruct(x.shape, x.dtype),
                                          jax.ShapeDtypeStruct(staging_shape, jnp.float32),
                                          jax.ShapeDtypeStruct(hidden_shape, jnp.float32)))
  operands = (x, ids, weights, w_in, w_out, workers, bounds, jnp.int32(0), jnp.int32(0))
  return call, operands, _fused._call_attrs(static, False, (-1, 0), kept_rows)


def test_every_attribute_reaches_the_handler():
  """A call the handler decodes: its attribute set is exactly the bound one (the decoder
  refuses a missing or extra attribute), and an unknown activation code is refused by name."""
  call, operands, good = _forward_by_hand()
  y = ccf.fused_moe(*operands[:5])
  np.testing.assert_allclose(y, ccf.reference_moe(*operands[:5]), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(call(*operands, **good.as_ffi())[0], y)
  with pytest.raises(jax.errors.JaxRuntimeError, match="unknown activation code 9"):
    call(*operands, **good._replace(activation=9).as_ffi())[0].block_until_ready()
  with pytest.raises(jax.errors.JaxRuntimeError, match="attributes"):
    call(*operands, **{**good.as_ffi(), "extra": np.int32(0)})[0].block_until_ready()


def test_handler_refuses_weights_of_a_third_dtype():
  """The handlers read expert_weights as float32 or as x's dtype: a direct custom call with
  another dtype (float16 weights for float32 x) is refused by the handler itself, not misread."""
  call, operands, attrs = _forward_by_hand(weights_dtype=jnp.float16)
  with pytest.raises(jax.errors.JaxRuntimeError,
                     match=re.escape("expert_weights must be float32 or x's dtype (float32), "
                                     "got float16")):
    call(*operands, **attrs.as_ffi())[0].block_until_ready()


def test_handler_errors_name_the_offending_values():
  """What only a direct custom call can get wrong is refused by the handler with the values it
  was given: the group size, an operand's dtype, the plan's shapes, the results' shapes."""
  call, operands, attrs = _forward_by_hand()
  refused = lambda message: pytest.raises(jax.errors.JaxRuntimeError, match=re.escape(message))
  with refused("num_devices must be >= 1, got 0"):
    call(*operands, **attrs._replace(num_devices=0).as_ffi())[0].block_until_ready()
  with refused("plan arrays must be workers [E, S + 1] and bounds [E, S + 2] with E = 2; got "
               "[2, 1] and [2, 3]"):
    call(*operands[:6], jnp.zeros((2, 3), jnp.int32), *operands[7:],
         **attrs.as_ffi())[0].block_until_ready()
  with refused("w_in and w_out must have x's dtype (float32), got float16 and float32"):
    call(*operands[:3], operands[3].astype(jnp.float16), *operands[4:],
         **attrs.as_ffi())[0].block_until_ready()
  call, operands, attrs = _forward_by_hand(staging_shape=(4, 2, 8))
  with refused("S = min(K, D) = 1; got y float32[4, 8] and staging float32[4, 2, 8] for x "
               "float32[4, 8]"):
    call(*operands, **attrs.as_ffi())[0].block_until_ready()


def test_staging_holds_every_slot_unless_peers_write_a_shared_workspace():
  """Peers in this process add their rows into the call's own staging result, so it must be
  [T, S, H]: the one element that stands in for it where they write the call's region of the
  shared workspaces (peers in other processes of the host) is refused here."""
  call, operands, attrs = _forward_by_hand(staging_shape=(1, 1, 1))
  with pytest.raises(jax.errors.JaxRuntimeError,
                     match=re.escape("staging [T, S, H] float32 ([1, 1, 1] with a shared "
                                     "workspace)")):
    call(*operands, **attrs.as_ffi())[0].block_until_ready()


def test_kept_hidden_rows_are_a_result_of_the_forward():
  """The forward's third result holds h = x @ w_in for the first C rows of the device's work
  list (experts in order, rows in (token, k) order); its shape must be [C, G*F] for the attribute
  kept_rows = C, one row where C = 0."""
  call, operands, attrs = _forward_by_hand(hidden_shape=(8, 6), kept_rows=8)
  x, ids, _, w_in = operands[:4]
  _, _, hidden = call(*operands, **attrs.as_ffi())
  order = np.argsort(np.asarray(ids).ravel(), kind="stable")  # by expert, then (token, k)
  expected = np.stack([np.asarray(x[i // 2] @ w_in[ids.ravel()[i]]) for i in order])
  np.testing.assert_allclose(hidden, expected, rtol=1e-5, atol=1e-5)
  for shape, kept in (((8, 5), 8), ((7, 6), 8), ((0, 6), 0)):
    call, operands, attrs = _forward_by_hand(hidden_shape=shape, kept_rows=kept)
    with pytest.raises(jax.errors.JaxRuntimeError,
                       match=re.escape(f"hidden must be [{max(kept, 1)}, G*F=6] float32 for "
                                       f"{kept} kept rows of x @ w_in per device; got "
                                       f"[{shape[0]}, {shape[1]}]")):
      call(*operands, **attrs.as_ffi())[0].block_until_ready()
