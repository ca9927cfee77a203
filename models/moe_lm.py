"""A small decoder-only byte-level transformer LM whose FFN blocks are Mixture-of-Experts (NNX).

Pre-norm blocks: `x + attention(rms_norm(x))`, then `x + ffn(rms_norm(x))`, where the FFN is a
`jax_ccfuser.nnx.MoE` (top-k of E experts, expert-parallel over `axis_name`) or, with
`num_experts=0`, a dense SwiGLU MLP of the same width (the baseline a user would start from).
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype
from jax.sharding import AxisType, PartitionSpec as P

from jax_ccfuser import update_expert_bias
from jax_ccfuser.nnx import MoE


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Sizes and MoE options of `MoeLM`.

  Attributes:
    vocab: tokens are bytes.
    seq_len: the context length (learned positions up to it).
    hidden: model width H.
    heads: attention heads; divides `hidden`.
    layers: transformer blocks.
    ffn: F, the hidden width of each expert (and of the dense MLP).
    num_experts: E per MoE block; 0 makes every FFN a dense MLP.
    k: experts per token.
    activation: the experts' activation.
    dispatch: "fused", "all_to_all" or "reference"; the parameters do not depend on it, so two
      models built from the same seed with different dispatch start identical.
    capacity_factor: `None` (dropless) or a float, for dispatch="all_to_all".
    reassign: let idle devices take over slices of hot experts (dispatch="fused"); the model
      computes the same function either way.
    replicas: with `reassign` across hosts, hot experts each device may hand to the other
      hosts per step (`jax_ccfuser.reassign`).
    score, num_groups, top_groups, scale: the routers' options (`jax_ccfuser.route`).
    expert_bias: give every router an `ExpertBias` for auxiliary-loss-free balancing
      (`MoeLM.update_expert_bias` steps them).
    num_shared_experts: shared experts beside the routed ones in every MoE block.
    axis_name: the expert-parallel mesh axis (also the batch axis), or `None`.
    dtype: compute dtype; parameters are float32.
  """
  vocab: int = 256
  seq_len: int = 128
  hidden: int = 64
  heads: int = 4
  layers: int = 2
  ffn: int = 128
  num_experts: int = 8
  k: int = 2
  activation: str = "swiglu"
  dispatch: str = "fused"
  capacity_factor: float | None = None
  reassign: bool = False
  replicas: int = 0
  score: str = "softmax"
  num_groups: int = 1
  top_groups: int | None = None
  scale: float = 1.0
  expert_bias: bool = False
  num_shared_experts: int = 0
  axis_name: str | None = "expert"
  dtype: Dtype = jnp.float32

  def __post_init__(self):
    for name in ("vocab", "seq_len", "hidden", "heads", "layers", "ffn"):
      if not getattr(self, name) >= 1:
        raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
    if self.hidden % self.heads:
      raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}")
    if self.num_experts < 0 or (self.num_experts and not 1 <= self.k <= self.num_experts):
      raise ValueError(f"need num_experts=0 (dense) or 1 <= k={self.k} <= num_experts="
                       f"{self.num_experts}")


class DenseFFN(nnx.Module):
  """A SwiGLU MLP `[..., H] -> [..., H]`: the dense counterpart of one expert."""

  def __init__(self, hidden: int, ffn: int, *, dtype: Dtype, rngs: nnx.Rngs):
    self.w_in = nnx.Linear(hidden, 2 * ffn, use_bias=False, dtype=dtype, rngs=rngs)
    self.w_out = nnx.Linear(ffn, hidden, use_bias=False, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    gate, up = jnp.split(self.w_in(x), 2, axis=-1)
    return self.w_out(jax.nn.silu(gate) * up)


class Block(nnx.Module):
  """One pre-norm transformer block; `__call__` returns `(x, aux)`, aux `None` when dense."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    c = config
    self.attention_norm = nnx.RMSNorm(c.hidden, dtype=c.dtype, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(c.heads, c.hidden, use_bias=False, decode=False,
                                            dtype=c.dtype, rngs=rngs)
    self.ffn_norm = nnx.RMSNorm(c.hidden, dtype=c.dtype, rngs=rngs)
    if c.num_experts:
      self.ffn = MoE(c.hidden, c.ffn, c.num_experts, k=c.k, activation=c.activation,
                     dispatch=c.dispatch, capacity_factor=c.capacity_factor,
                     reassign=c.reassign, replicas=c.replicas, score=c.score,
                     num_groups=c.num_groups, top_groups=c.top_groups, scale=c.scale,
                     expert_bias=c.expert_bias,
                     num_shared_experts=c.num_shared_experts, axis_name=c.axis_name,
                     dtype=c.dtype, rngs=rngs)
    else:
      self.ffn = DenseFFN(c.hidden, c.ffn, dtype=c.dtype, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attention(self.attention_norm(x), mask=mask)
    out = self.ffn(self.ffn_norm(x))
    y, aux = out if isinstance(self.ffn, MoE) else (out, None)
    return x + y, aux


class MoeLM(nnx.Module):
  """Byte-level decoder-only LM.

  Args:
    config: the model's `LMConfig`.
    rngs: the `params` stream initializes every weight.

  Examples:
    >>> from flax import nnx
    >>> from models.moe_lm import LMConfig, MoeLM
    >>> model = MoeLM(LMConfig(axis_name=None), rngs=nnx.Rngs(0))
    >>> logits, aux = model(jnp.zeros((2, 128), jnp.int32))  # [2, 128, 256]; one MoEAux a layer
  """

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = nnx.Embed(config.vocab, config.hidden, dtype=config.dtype, rngs=rngs)
    self.positions = nnx.Embed(config.seq_len, config.hidden, dtype=config.dtype, rngs=rngs)
    self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.layers)])
    self.norm = nnx.RMSNorm(config.hidden, dtype=config.dtype, rngs=rngs)
    self.head = nnx.Linear(config.hidden, config.vocab, use_bias=False, dtype=config.dtype,
                           rngs=rngs)

  def __call__(self, tokens: jax.Array) -> tuple[jax.Array, tuple]:
    """Next-byte logits.

    Args:
      tokens: `[B, S]` int32 bytes (below `vocab`: an embedding lookup out of range gives NaN),
        `S <= seq_len`; with an expert axis in the mesh, `B * S` divisible by its size.

    Returns:
      `(logits, aux)`: logits `[B, S, vocab]` float32 (position s predicts byte s + 1) and one
      `MoEAux` per MoE block (an empty tuple for a dense model).
    """
    s = tokens.shape[1]
    if s > self.config.seq_len:  # the positions' lookup would give NaN, which spreads to all
      raise ValueError(f"tokens {list(tokens.shape)} are longer than seq_len="
                       f"{self.config.seq_len} (a [B, seq_len + 1] training window holds the "
                       f"inputs and their targets)")
    x = self._embed(tokens) + self.positions(jnp.arange(s))
    mask = nnx.make_causal_mask(tokens)
    auxes = []
    for block in self.blocks:
      x, aux = block(x, mask)
      if aux is not None:
        auxes.append(aux)
    return self.head(self.norm(x)).astype(jnp.float32), tuple(auxes)

  def _embed(self, tokens: jax.Array) -> jax.Array:
    sharding = jax.typeof(tokens).sharding
    if AxisType.Explicit not in getattr(sharding.mesh, "axis_types", ()):
      return self.embed(tokens)
    # Tokens split over an Explicit mesh axis: the lookup (a gather) must name its result's
    # sharding, the tokens' own with the features whole.
    table = self.embed.embedding[...].astype(self.config.dtype)
    return table.at[tokens].get(out_sharding=P(*sharding.spec, None), mode="fill",
                                fill_value=jnp.nan)

  def update_expert_bias(self, auxes: tuple, *, rate: float) -> None:
    """Steps every MoE block's expert bias from the load it reported (auxiliary-loss-free
    balancing, `jax_ccfuser.update_expert_bias`); outside the gradient, after the optimizer.

    Args:
      auxes: the `MoEAux` per MoE block that `__call__` returned for this step's batch.
      rate: the bias update speed; blocks without an expert bias are left as they are.
    """
    moes = [block.ffn for block in self.blocks if isinstance(block.ffn, MoE)]
    for moe, aux in zip(moes, auxes, strict=True):
      if moe.expert_bias is not None:
        moe.expert_bias[...] = update_expert_bias(moe.expert_bias[...], aux.counts, rate=rate)
