"""Bad input and failures: each fault, the error it raises, and the README table made from them.

The README's table of errors is made from the faults below: run
`.venv/bin/python tests/test_errors_table.py` to regenerate it; `test_readme_error_table` fails
when the table and the errors raised part ways.
"""

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

import jax_ccfuser as ccf
from bench import report
from hardening_cases import TEST_PEER_TIMEOUT_S, bounded, error_of
from jax_ccfuser import _extension
from moe_cases import Case, make_inputs, shard_ep


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
  layer = shard_ep(lambda *a, axis_name: ccf.fused_moe(*a, axis_name=axis_name, **options), 2)
  return jax.jit(layer), tuple(args[n] for n in names)


def _with_id(value):
  """`_FAULT_CASE`'s ids with token 1, slot 1 of device 1 set to `value`."""
  ids = make_inputs(_FAULT_CASE)[1]
  return ids.at[_FAULT_CASE.tokens + 1, 1].set(value)


def _reassign_ten_experts_over_four():
  layer = shard_ep(lambda ids, axis_name: ccf.reassign(ids, 10, axis_name=axis_name).workers, 4)
  return jax.jit(layer), (jnp.zeros((8, 2), jnp.int32),)


def _outside_shard_map():
  return jax.jit(functools.partial(ccf.fused_moe, axis_name="ep")), make_inputs(_FAULT_CASE)


def _missing_peer():
  """`fused_moe` in one branch of a `lax.cond` that device 0 does not take."""
  def body(x, ids, weights, w_in, w_out, axis_name):
    return jax.lax.cond(jax.lax.axis_index(axis_name) == 0, lambda: x,
                        lambda: ccf.fused_moe(x, ids, weights, w_in, w_out, axis_name=axis_name))
  return jax.jit(shard_ep(body, 2)), make_inputs(_FAULT_CASE)


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
           "`fail_next_call_for_testing(1)`; it still meets its peers at the compute barrier)",
           lambda: _fused_on_fault_case(),
           arm=lambda: _extension.cpu.fail_next_call_for_testing(1)),
]


class _Raised(NamedTuple):
  when: str  # "tracing" or "running"
  error: Exception


def _trigger(fault: _Fault) -> _Raised:
  """Traces, compiles and runs `fault`'s function; the error it raises and at which stage."""
  fn, args = fault.make()
  with ccf.peer_timeout(TEST_PEER_TIMEOUT_S):
    try:
      compiled = fn.lower(*args).compile()
    except ValueError as e:
      return _Raised("tracing", e)
    fault.arm()
    error = bounded(lambda: error_of(compiled(*args)))
  if error is None:
    raise AssertionError(f"{fault.what}: no error raised")
  return _Raised("running", error)


# The README section, written as bench/report.py writes the benchmark sections.
_SECTION = dict(start="<!-- errors:start -->", end="<!-- errors:end -->",
                heading="Bad input and failures")

_INTRO = """\
What each fault raises, as recorded by running it (2 devices, `T=3`, `H=4`, `F=5`, `E_local=2`,
`K=2`, swiglu, `ccf.peer_timeout(1.0)`; `tests/test_errors_table.py` regenerates this table when run
as a script, and fails when the table and the errors part ways). Shapes, dtypes and options are
checked while tracing (a `ValueError` from the call); values are checked by the kernels, so a bad
expert id raises `jax.errors.JaxRuntimeError` when the result is computed (every device checks
every id before it computes anything). A device whose peer never arrives, or fails midway, stops
waiting after the peer timeout (default 300 s, `JAX_CCFUSER_PEER_TIMEOUT`, or
`with ccf.peer_timeout(seconds):` around the call: like JAX's own settings, ours are
thread-local and keys of `jax.jit`'s cache, so a jitted function traces again under another value)
and raises `DEADLINE_EXCEEDED`; the caller gets
one device's error (a failing device's own, when one failed). Nothing hangs, and the next call of
the same function works. The settings' environment variables (`JAX_CCFUSER_PEER_TIMEOUT`,
`_TRANSPORT`, `_RESIDUAL_BUDGET`, `_SCRATCH_BUDGET`, `_FETCH_SMS`) are checked when jax_ccfuser is
imported, as the settings' own values are: a bad one fails the import, naming it.
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


def test_readme_error_table():
  readme = report.README.read_text()
  assert report.rewrite_readme(readme, error_table(), **_SECTION) == readme, (
      "README.md's error table differs from the errors raised; regenerate it with "
      "`.venv/bin/python tests/test_errors_table.py`")


if __name__ == "__main__":
  import conftest  # noqa: F401  (the eight simulated devices the table was made with)

  report.write_section(error_table(), **_SECTION)
  print(f"wrote the error table into {report.README}")
