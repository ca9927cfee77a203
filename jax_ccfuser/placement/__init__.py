"""Expert placement: which device holds which expert, chosen from recorded routing statistics.

Three steps, each usable on its own:

1. **Record.** `RoutingStats` counts, per MoE layer, the (token, k) rows each source device sends
   to each expert, and across consecutive layers the expert(l) -> expert(l + 1) transitions of
   every token. `routing_stats` counts one step (jittable); `RoutingStats.update` adds a step to
   running totals; `capture_expert_ids` gets the ids out of an NNX model's
   `jax_ccfuser.nnx.MoE` layers inside a jitted training step.
2. **Solve.** `solve` picks a permutation of each layer's experts, by an integer linear program
   over load balance, rows that leave their device and the cross-layer term (MoETuner), or
   greedily, each expert near the devices that send it most rows (CCFuser): `METHODS` names
   the two. `score` measures any placement on statistics.
3. **Apply.** `apply` moves the experts of a live NNX model and of its optimizer state, and the
   router's output columns with them, so the model computes exactly the same function; `permute`
   does the same to plain pytrees (Linen params, Optax states, `nnx.State`).

Layout: a layer's expert (slot) `s` lives on device `s // E_local`, `E_local = E / D`, as in
`jax_ccfuser.fused_moe`. A permutation `perm` `[E]` says which old expert goes to each new slot:
`new_w_in[s] = old_w_in[perm[s]]`.

Examples:
  Two layers whose tokens on device 0 all pick experts 2 and 3 (device 1's), and those on
  device 1 experts 0 and 1:

  >>> from jax_ccfuser import placement
  >>> ids = jnp.array([[2, 3]] * 4 + [[0, 1]] * 4)  # [N, K]: device 0's 4 tokens, then device 1's
  >>> stats = placement.RoutingStats.zeros(num_layers=2, num_devices=2, num_experts=4)
  >>> stats = stats.update([ids, ids])  # in the training step, each layer's ids
  >>> solution = placement.solve(stats, 2, method="ilp", time_limit=5.0)
  >>> solution.perms.tolist()  # slot s of each layer gets old expert perms[l, s]
  [[2, 3, 0, 1], [2, 3, 0, 1]]
  >>> placement.score(stats, solution.perms).remote_fraction.tolist()  # 1.0 before
  [0.0, 0.0]

  `placement.apply(model, optimizer, solution.perms)` then moves a live NNX model's experts.

Modules: `_stats` (recording), `_solve` (placing) and `_permute` (applying to pytrees) need
neither Flax nor SciPy (the ILP imports SciPy when it runs); `_nnx` (the NNX model helpers)
imports Flax and is loaded on first use of `moe_layers`, `capture_expert_ids` or `apply`.
"""

from typing import TYPE_CHECKING

from jax_ccfuser.placement._permute import permute
from jax_ccfuser.placement._solve import METHODS
from jax_ccfuser.placement._solve import Score
from jax_ccfuser.placement._solve import Solution
from jax_ccfuser.placement._solve import score
from jax_ccfuser.placement._solve import solve
from jax_ccfuser.placement._stats import RoutingStats
from jax_ccfuser.placement._stats import routing_stats

# Flax is an optional dependency: these names load the NNX adapter, and Flax with it, on first
# use, so the rest of the package works without Flax.
_NNX_NAMES = ("apply", "capture_expert_ids", "moe_layers")


if TYPE_CHECKING:  # type checkers see the names and their signatures; a typo is an error
  from jax_ccfuser.placement._nnx import apply, capture_expert_ids, moe_layers
else:
  def __getattr__(name: str) -> object:
    if name in _NNX_NAMES:
      from jax_ccfuser.placement import _nnx
      return getattr(_nnx, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

del TYPE_CHECKING  # dir() lists the module's globals; this one is not its name


def __dir__() -> list[str]:  # dir() and help() list the names loaded on first use too
  return sorted([*globals(), *_NNX_NAMES])


__all__ = [
    "RoutingStats",
    "routing_stats",
    "capture_expert_ids",
    "moe_layers",
    "METHODS",
    "Solution",
    "Score",
    "solve",
    "score",
    "permute",
    "apply",
]
