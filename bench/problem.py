"""One benchmark configuration: its sizes, its useful FLOPs and its random inputs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import jax_ccfuser as ccf
from jax_ccfuser._ffn import ACTIVATIONS

# The activation every benchmark runs. The FLOPs, the inputs and the roof follow from it: a
# gated one's `w_in` is `[H, 2F]`, so one routed row costs three `H x F` products forward.
ACTIVATION = "swiglu"
_GATE = 2 if ACTIVATIONS[ACTIVATION].gated else 1
GEMMS_PER_ROW = _GATE + 1

# Logit added to expert 0 for the tokens that skew toward it: large enough that top-k always
# picks it first.
_HOT_LOGIT = 30.0


@dataclasses.dataclass(frozen=True)
class Config:
  """Sizes of one MoE layer, per device; the `config` object of a result record."""
  devices: int   # D, the expert-parallel group (simulated or emulated devices)
  tokens: int    # T, tokens per device
  hidden: int    # H
  ffn: int       # F
  experts: int   # E, over the whole group
  k: int         # K, experts per token
  dtype: str = "float32"
  skew: float = 0.0  # share of tokens that all pick expert 0 (on device 0) first

  def __post_init__(self):
    for name in ("devices", "tokens", "hidden", "ffn", "experts"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
    if self.experts % self.devices:
      raise ValueError(f"experts={self.experts} must split evenly over devices={self.devices}")
    if not 1 <= self.k <= self.experts:
      raise ValueError(f"k={self.k} must be in [1, experts={self.experts}]")
    if not 0.0 <= self.skew <= 1.0:
      raise ValueError(f"skew={self.skew} must be in [0, 1]")

  @property
  def pairs(self) -> int:
    """Routed (token, k) rows over the whole group."""
    return self.devices * self.tokens * self.k

  def useful_flop(self, backward: bool) -> float:
    """FLOPs of the routed rows' expert FFNs, over the whole group.

    Forward is `2 * rows * H * 3F` (gate, up and down products; `2F` ungated); the backward's
    data and weight gradients are twice that, so forward+backward counts three times the
    forward. Padding rows, dropped rows and recomputation are not useful work and are never
    counted (a program that drops rows is credited with the rows it kept).
    """
    forward = 2.0 * self.pairs * self.hidden * GEMMS_PER_ROW * self.ffn
    return 3.0 * forward if backward else forward


def make_inputs(config: Config, *, seed: int = 0):
  """Global arrays of one layer call, device `d`'s shard being its `d`-th block.

  Routing comes from `jax_ccfuser.route` on random logits; a `skew` share of the tokens gets
  `_HOT_LOGIT` added to expert 0, so it is their first choice and the rest of their K are
  random.

  Returns:
    x `[D*T, H]`, expert_ids `[D*T, K]` int32, expert_weights `[D*T, K]` float32,
    w_in `[E, H, 2F]` (`[E, H, F]` ungated), w_out `[E, F, H]`; floats in `config.dtype`, with
    unit-scale outputs.
  """
  rng = np.random.default_rng(seed)
  n, e, h, f = config.devices * config.tokens, config.experts, config.hidden, config.ffn
  logits = rng.standard_normal((n, e), dtype=np.float32)
  logits[:, 0] += np.where(rng.uniform(size=n) < config.skew, _HOT_LOGIT, 0.0)
  # On the device first, as x and the weights are: initcheck's 1184 uninitialised reads on an
  # H200 (5979eba, in XLA's input_reduce_fusion) are likely the [148, 8] float32 logits, the one
  # operand the jitted route took from NumPy (to be confirmed by the next GPU check).
  expert_ids, expert_weights, _ = jax.jit(ccf.route, static_argnums=1)(jnp.asarray(logits),
                                                                       config.k)
  dtype = jnp.dtype(config.dtype)
  x = jnp.asarray(rng.standard_normal((n, h), dtype=np.float32), dtype)
  w_in = jnp.asarray(rng.standard_normal((e, h, _GATE * f), dtype=np.float32) / np.sqrt(h),
                     dtype)
  w_out = jnp.asarray(rng.standard_normal((e, f, h), dtype=np.float32) / np.sqrt(f), dtype)
  return x, expert_ids, expert_weights, w_in, w_out
