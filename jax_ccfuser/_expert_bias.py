"""The router's bias as an NNX variable type, registered under the Linen layer's collection name;
both layers import it, so `nnx.bridge` maps the one to the other whichever was imported."""

from flax import nnx


@nnx.register_variable_name("expert_bias", overwrite=True)
class ExpertBias(nnx.Variable):
  """A router's per-expert bias (`[E]` float32): it shifts which experts are chosen, not the
  combine weights (`jax_ccfuser.route`'s `expert_bias`).

  Not an `nnx.Param`: `nnx.grad` and `nnx.Optimizer(..., wrt=nnx.Param)` leave it alone, and
  `jax_ccfuser.update_expert_bias` moves it from the loads the layer reports. It is saved with the
  model's state (`nnx.state(model)`); `nnx.state(model, ExpertBias)` selects every layer's bias.
  The Linen twin keeps it in the `"expert_bias"` collection, the name registered here for it
  (so `nnx.bridge` makes a bridged Linen layer's bias one); registered over any earlier type of
  that name, which `nnx.bridge` makes up for a collection it meets before this module is loaded.
  """
