"""Training `MoeLM` on the standard library's sources: data, Optax loop, checkpoints, sampling.

Nothing here knows about experts beyond adding the router's auxiliary losses to the task loss
and stepping the routers' expert biases (when the model has them) from the loads the forward
pass reports: the loop is the plain `nnx.Optimizer` + `optax.chain(clip, adamw)` one a dense
model uses.
"""

import dataclasses
import functools
import math
import pathlib
import sysconfig
import time
import zlib
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P


class Corpus(NamedTuple):
  train: np.ndarray       # [N_train] uint8
  validation: np.ndarray  # [N_val] uint8


def load_corpus(*, max_bytes: int | None = None, validation_every: int = 10) -> Corpus:
  """The standard library's `.py` files as bytes, split by file into train and validation.

  Files are read in sorted path order (installed packages under `site-packages` excluded) and
  joined with a blank line; a file goes to validation when the CRC-32 of its path relative to the
  library root is `0 mod validation_every`, so the split is the same on every run and machine
  with the same Python.

  Args:
    max_bytes: read about this many bytes in all, `1 / validation_every` of them for validation
      (a split stops taking files once it has its share); `None`: everything.
    validation_every: about one file in this many is held out.

  Returns:
    A `Corpus`.
  """
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  # Installed packages live under the library root too; they are not the standard library.
  tops = [p for p in root.iterdir() if p.name not in ("site-packages", "dist-packages")]
  paths = sorted(f for top in tops for f in ([top] if top.is_file() else top.rglob("*")))
  share = {True: 1 / validation_every, False: 1 - 1 / validation_every}
  parts, sizes = {True: [], False: []}, {True: 0, False: 0}
  for path in paths:
    if path.suffix != ".py":
      continue
    relative = path.relative_to(root).as_posix()
    held_out = zlib.crc32(relative.encode()) % validation_every == 0
    if max_bytes is not None and sizes[held_out] >= share[held_out] * max_bytes:
      if all(sizes[s] >= share[s] * max_bytes for s in sizes):
        break
      continue
    text = path.read_bytes() + b"\n\n"
    parts[held_out].append(text)
    sizes[held_out] += len(text)
  as_array = lambda chunks: np.frombuffer(b"".join(chunks), np.uint8)
  return Corpus(train=as_array(parts[False]), validation=as_array(parts[True]))


def batch_at(data: np.ndarray, step: int, *, batch: int, seq_len: int, seed: int) -> np.ndarray:
  """Batch `step` of a run: `batch` random windows, a function of (seed, step) only.

  A resumed run therefore sees exactly the batches the uninterrupted run would have.

  Returns:
    `[batch, seq_len + 1]` int32 bytes (inputs are `[:, :-1]`, targets `[:, 1:]`).
  """
  if len(data) < seq_len + 2:
    raise ValueError(f"{len(data)} bytes of data are too few for windows of {seq_len + 1}")
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, len(data) - seq_len - 1, size=batch)
  return np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimizer, loss and data options of `train`.

  Attributes:
    batch: sequences per step (divisible by the expert axis size: the batch is split over it).
    learning_rate: peak learning rate (linear warm-up from 0, then cosine decay to 10%; with a
      warm-up the first step's rate is 0, so that step only starts Adam's moments).
    warmup_steps: steps of the warm-up, fewer than `total_steps` (the decay needs one).
    total_steps: length of the schedule (a resumed run keeps the same schedule).
    weight_decay: AdamW's decoupled weight decay.
    clip_norm: global gradient-norm clip.
    load_balancing_coef: weight of each MoE block's load-balancing loss.
    z_loss_coef: weight of each MoE block's router z-loss.
    expert_bias_rate: the update speed of the routers' expert biases, for a model with them
      (DeepSeek-V3's 1e-3 by default).
    seed: data order (model initialization has its own `nnx.Rngs`).
  """
  batch: int = 16
  learning_rate: float = 3e-3
  warmup_steps: int = 20
  total_steps: int = 200
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  load_balancing_coef: float = 1e-2
  z_loss_coef: float = 1e-3
  expert_bias_rate: float = 1e-3
  seed: int = 0

  def __post_init__(self):
    if self.batch < 1 or self.total_steps < 1 or not 0 <= self.warmup_steps < self.total_steps:
      raise ValueError(f"need batch >= 1 and 0 <= warmup_steps < total_steps, got {self}")
    # `not x > 0` refuses NaN too; an infinite rate or clip is no setting either.
    for name, least_excluded in (("learning_rate", True), ("clip_norm", True),
                                 ("weight_decay", False), ("load_balancing_coef", False),
                                 ("z_loss_coef", False), ("expert_bias_rate", False)):
      value = getattr(self, name)
      if not (math.isfinite(value) and (value > 0 if least_excluded else value >= 0)):
        raise ValueError(f"{name}={value} must be finite and "
                         f"{'positive' if least_excluded else 'at least 0'}")


# One transformation object per config: it is static in the optimizer's graph, so optimizers
# built from equal configs then share `train_step`'s compilation instead of retracing it.
@functools.cache
def _transformation(config: TrainConfig) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, config.warmup_steps, config.total_steps,
      end_value=0.1 * config.learning_rate)
  return optax.chain(optax.clip_by_global_norm(config.clip_norm),
                     optax.adamw(schedule, weight_decay=config.weight_decay))


def make_optimizer(model: nnx.Module, config: TrainConfig) -> nnx.Optimizer:
  """AdamW with global-norm clipping over every `nnx.Param` of `model`."""
  return nnx.Optimizer(model, _transformation(config), wrt=nnx.Param)


def cross_entropy(model: nnx.Module, tokens: jax.Array):
  """Mean next-byte cross-entropy of `tokens` `[B, S + 1]` and the model's router auxiliaries."""
  logits, auxes = model(tokens[:, :-1])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
  return loss, auxes


@nnx.jit(static_argnames="config")
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, tokens: jax.Array, *,
               config: TrainConfig) -> dict[str, jax.Array]:
  """One AdamW step on `tokens` `[B, S + 1]` int32, then one step of the expert biases.

  Returns:
    Metrics: `loss` (cross-entropy, float32 `[]`), `aux_loss` (the weighted router losses, `[]`)
    `expert_counts` (`[L, E]` int32, (token, k) assignments per MoE block and expert; `[0, 0]`
    for a dense model) and `device_loads` (`[L, 2, D]` int32, rows each device computes without
    and with reassignment; `[0, 2, 0]` for a dense model).
  """
  def objective(model):
    loss, auxes = cross_entropy(model, tokens)
    aux_loss = sum((config.load_balancing_coef * a.load_balancing_loss
                    + config.z_loss_coef * a.z_loss for a in auxes), jnp.float32(0))
    return loss + aux_loss, (loss, aux_loss, auxes)

  grads, (loss, aux_loss, auxes) = nnx.grad(objective, has_aux=True)(model)
  optimizer.update(model, grads)
  model.update_expert_bias(auxes, rate=config.expert_bias_rate)
  counts = (jnp.stack([a.counts for a in auxes]) if auxes else jnp.zeros((0, 0), jnp.int32))
  loads = (jnp.stack([a.device_loads for a in auxes]) if auxes
           else jnp.zeros((0, 2, 0), jnp.int32))
  return {"loss": loss, "aux_loss": aux_loss, "expert_counts": counts, "device_loads": loads}


@nnx.jit
def _eval_loss(model, tokens):
  return cross_entropy(model, tokens)[0]


def evaluate(model: nnx.Module, data: np.ndarray, *, batches: int, batch: int,
             place: Callable[[np.ndarray], jax.Array]) -> float:
  """Mean cross-entropy (nats per byte) over `batches` fixed windows of `data`."""
  seq_len = model.config.seq_len
  losses = [_eval_loss(model, place(batch_at(data, i, batch=batch, seq_len=seq_len, seed=0)))
            for i in range(batches)]
  return float(np.mean(losses))


def batch_placer(mesh: jax.sharding.Mesh | None, axis_name: str | None):
  """A function putting a host batch on the devices, split over `axis_name` when there is a mesh."""
  if mesh is None or axis_name is None:
    return jnp.asarray
  sharding = NamedSharding(mesh, P(axis_name))
  return lambda a: jax.device_put(a, sharding)


def train(model: nnx.Module, optimizer: nnx.Optimizer, data: np.ndarray, config: TrainConfig, *,
          steps: int, place: Callable[[np.ndarray], jax.Array],
          history: list[dict] | None = None,
          checkpoints: ocp.CheckpointManager | None = None,
          on_step: Callable[[dict], None] | None = None) -> list[dict]:
  """Runs `optimizer` from its current step up to `steps`.

  Args:
    model, optimizer: from `MoeLM(...)` and `make_optimizer`, already placed on the mesh.
    data: the training bytes.
    config: the run's `TrainConfig`.
    steps: the step to stop at (a resumed run starts from `optimizer.step`).
    place: puts a host batch on the devices (`batch_placer`).
    history: the records of the steps already taken (from `restore`), extended in place.
    checkpoints: saves at its interval and after the last step.
    on_step: called with each new record (a progress bar).

  Returns:
    The history: one record per step, `{"step", "loss", "aux_loss", "expert_counts" ([L][E]),
    "device_loads" ([L][2][D]), "seconds"}`; `seconds` is `None` for the first step of a
    session (it includes compilation).
  """
  history = [] if history is None else history
  start = int(optimizer.step[...])
  for step in range(start, steps):
    tokens = place(batch_at(data, step, batch=config.batch, seq_len=model.config.seq_len,
                            seed=config.seed))
    began = time.perf_counter()
    metrics = jax.device_get(train_step(model, optimizer, tokens, config=config))
    seconds = time.perf_counter() - began
    record = {"step": step, "loss": float(metrics["loss"]),
              "aux_loss": float(metrics["aux_loss"]),
              "expert_counts": metrics["expert_counts"].tolist(),
              "device_loads": metrics["device_loads"].tolist(),
              "seconds": None if step == start else seconds}
    history.append(record)
    if on_step is not None:
      on_step(record)
    if checkpoints is not None:
      save(checkpoints, step + 1, model, optimizer, history, force=step + 1 == steps)
  if checkpoints is not None:
    checkpoints.wait_until_finished()
  return history


def checkpoint_manager(directory: str | pathlib.Path, *, every: int) -> ocp.CheckpointManager:
  """An Orbax manager keeping the last two checkpoints, saving every `every` steps."""
  options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=2)
  # Handlers named up front, so that a checkpoint's shapes can be read before it is restored.
  handlers = dict(state=ocp.StandardCheckpointHandler(), history=ocp.JsonCheckpointHandler())
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options,
                               item_handlers=handlers)


def save(checkpoints: ocp.CheckpointManager, step: int, model: nnx.Module,
         optimizer: nnx.Optimizer, history: list[dict], *, force: bool = False) -> None:
  """Saves parameters, optimizer state and history as checkpoint `step` (the steps taken)."""
  checkpoints.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(nnx.state((model, optimizer))),
      # A copy: an asynchronous save may write after the caller has appended further steps.
      history=ocp.args.JsonSave(list(history))), force=force)


def _arrays(tree) -> dict:
  """`{path: "dtype[shape]"}` of a state's leaves or a checkpoint's metadata, the paths written
  alike for both ("0/blocks/0/ffn/w_in/value"); a Python number is a scalar of its NumPy type,
  as Orbax saves it."""
  name = lambda key: str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key))))
  kind = lambda leaf: np.dtype(leaf.dtype if hasattr(leaf, "dtype") else np.result_type(leaf))
  return {"/".join(map(name, path)): f"{kind(leaf).name}{list(np.shape(leaf))}"
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _check_fits(checkpoints: ocp.CheckpointManager, step: int, abstract) -> None:
  """Refuses checkpoint `step` where its arrays are not those of `abstract` (a model or
  optimizer of other settings): Orbax would fail part-way through restoring, its error among
  its shutdown's."""
  saved, here = _arrays(checkpoints.item_metadata(step)["state"]), _arrays(abstract)
  differ = [f"{path}: saved {saved.get(path, 'nothing')}, here {here.get(path, 'nothing')}"
            for path in sorted(saved.keys() | here.keys()) if saved.get(path) != here.get(path)]
  if differ:
    raise ValueError(
        f"checkpoint {step} in {checkpoints.directory} holds another model or optimizer than "
        f"this one: {len(differ)} arrays differ ({'; '.join(differ[:3])}"
        f"{'; ...' if len(differ) > 3 else ''}). Resume with the settings it was saved with, "
        f"or start afresh (the demo: without --resume)")


def restore(checkpoints: ocp.CheckpointManager, model: nnx.Module,
            optimizer: nnx.Optimizer) -> list[dict]:
  """Loads the latest checkpoint into `model` and `optimizer` (keeping their shardings).

  Returns:
    The saved history, or `[]` when there is no checkpoint (nothing is changed then).

  Raises:
    ValueError: the checkpoint's arrays are not those of `model` and `optimizer` (a run of
      other settings saved it); nothing is changed then either.
  """
  step = checkpoints.latest_step()
  if step is None:
    return []
  state = nnx.state((model, optimizer))
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  _check_fits(checkpoints, step, abstract)
  restored = checkpoints.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), history=ocp.args.JsonRestore()))
  nnx.update((model, optimizer), restored["state"])
  return restored["history"]


def dropless(model: nnx.Module) -> nnx.Module:
  """`model` itself, or where its layers drop rows past a capacity, a twin that drops none and
  shares its state: in a padded window the padding would compete with the real tokens for the
  experts' capacity (and the logits at the cursor would depend on it)."""
  if getattr(model.config, "capacity_factor", None) is None:
    return model
  config = dataclasses.replace(model.config, capacity_factor=None)
  twin = nnx.eval_shape(lambda: type(model)(config, rngs=nnx.Rngs(0)))
  nnx.update(twin, nnx.state(model))
  return twin


@nnx.jit
def _next_logits(model, window, position):
  logits, _ = model(window)
  return logits[:, position]


def generate(model: nnx.Module, prompt: bytes, *, length: int, temperature: float = 0.0,
             seed: int = 0, place: Callable[[np.ndarray], jax.Array] = jnp.asarray) -> bytes:
  """Continues `prompt` by `length` bytes: greedy at temperature 0, else sampled.

  Each byte costs one forward pass over a fixed `[1, seq_len]` window (one compilation; the
  positions after the cursor are padding a causal model never looks at). A model whose layers
  drop rows past a capacity samples without dropping (`dropless`), as the padding would
  otherwise take capacity from the real tokens.

  Returns:
    The `length` generated bytes.
  """
  if not prompt:
    raise ValueError("generate needs a prompt of at least one byte")
  seq_len = model.config.seq_len
  model = dropless(model)
  text = list(prompt)
  key = jax.random.key(seed)
  for _ in range(length):
    context = text[-seq_len:]
    window = np.zeros((1, seq_len), np.int32)
    window[0, :len(context)] = context
    logits = _next_logits(model, place(window), len(context) - 1)[0]
    if temperature > 0:
      key, sample_key = jax.random.split(key)
      byte = jax.random.categorical(sample_key, logits / temperature)
    else:
      byte = jnp.argmax(logits)
    text.append(int(byte))
  return bytes(text[len(prompt):])
