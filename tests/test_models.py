"""The MoE LM and its training loop: the loss falls, the fused and all-to-all paths agree step by
step, checkpoints round-trip and a resumed run continues identically, the demo CLI runs; the CLIs
refuse settings they cannot finish with before training."""

import dataclasses
import json
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from models.moe_lm import LMConfig, MoeLM
from models.train import (TrainConfig, _next_logits, batch_placer, checkpoint_manager, dropless,
                          load_corpus, make_optimizer, restore, save, train)
from moe_cases import ep_mesh

DEVICES = 4
STEPS = 12
# Tiny on purpose (each path compiles once); the same sizes as test_flax's Optax test.
LM = LMConfig(seq_len=16, hidden=32, heads=2, layers=1, ffn=32, num_experts=8, axis_name="ep")
TRAIN = TrainConfig(batch=4, learning_rate=1e-2, warmup_steps=2, total_steps=STEPS)
# Per-step loss agreement between the paths: they differ only in float32 summation order.
LOSS_RTOL = 1e-5

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus():
  return load_corpus(max_bytes=400_000)


def _run(dispatch, data, *, steps=STEPS, seed=0, checkpoints=None, restore_from=None,
         mesh=None):
  """Trains the tiny LM with `dispatch` up to `steps`; returns (model, optimizer, history)."""
  mesh = mesh or ep_mesh(DEVICES)
  with jax.set_mesh(mesh):
    model = MoeLM(LMConfig(**{**vars(LM), "dispatch": dispatch}), rngs=nnx.Rngs(seed))
    optimizer = make_optimizer(model, TRAIN)
    history = [] if restore_from is None else restore(restore_from, model, optimizer)
    history = train(model, optimizer, data, TRAIN, steps=steps, place=batch_placer(mesh, "ep"),
                    history=history, checkpoints=checkpoints)
  return model, optimizer, history


@pytest.fixture(scope="module")
def fused_run(corpus):
  return _run("fused", corpus.train)


def _losses(history):
  return np.asarray([r["loss"] for r in history])


def _params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_loss_falls(fused_run):
  losses = _losses(fused_run[2])
  assert len(losses) == STEPS and np.all(np.isfinite(losses))
  # From ~log(256) = 5.5 nats/byte at init to well below the unigram entropy's neighbourhood.
  assert losses[-3:].mean() < losses[0] - 1.0, losses


def test_fused_and_all_to_all_agree_step_by_step(corpus, fused_run):
  model, _, history = _run("all_to_all", corpus.train)
  np.testing.assert_allclose(_losses(history), _losses(fused_run[2]), rtol=LOSS_RTOL)
  np.testing.assert_array_equal([r["expert_counts"] for r in history],
                                [r["expert_counts"] for r in fused_run[2]])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               _params(model), _params(fused_run[0]))


def test_training_on_an_explicit_mesh_follows_the_auto_one(corpus, fused_run):
  """`jax.make_mesh`'s default axes are Explicit: the embedding lookup of tokens split over one
  must name its result's sharding (a gather raises ShardingTypeError there otherwise)."""
  mesh = jax.make_mesh((DEVICES,), ("ep",), axis_types=(AxisType.Explicit,),
                       devices=jax.devices()[:DEVICES])
  _, _, history = _run("fused", corpus.train, steps=3, mesh=mesh)
  np.testing.assert_allclose(_losses(history), _losses(fused_run[2])[:3], rtol=LOSS_RTOL)


def test_configs_refuse_what_cannot_train_and_inputs_past_the_context():
  for fields, message in (({"warmup_steps": 12}, "warmup_steps < total_steps"),
                          ({"learning_rate": float("nan")}, "learning_rate=nan must be finite"),
                          ({"learning_rate": -1e-3}, "positive"),
                          ({"clip_norm": 0.0}, "clip_norm=0.0 must be finite and positive"),
                          ({"weight_decay": -1.0}, "weight_decay=-1.0 must be finite and at")):
    with pytest.raises(ValueError, match=re.escape(message)):
      dataclasses.replace(TRAIN, **fields)
  with pytest.raises(ValueError, match="heads=0 must be at least 1"):
    dataclasses.replace(LM, heads=0)
  model = MoeLM(dataclasses.replace(LM, axis_name=None), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"tokens \[2, 17\] are longer than seq_len=16"):
    model(np.zeros((2, 17), np.int32))  # a training window ([B, seq_len + 1]) passed whole


def test_sampling_does_not_depend_on_the_padding_of_a_capacity_model():
  """generate pads its window after the cursor; with capacity-capped experts the padding took
  capacity from the real tokens, moving the cursor's logits by up to 1.4."""
  config = dataclasses.replace(LM, dispatch="all_to_all", capacity_factor=1.0)
  prompt = np.frombuffer(b"def ", np.uint8)  # 4 bytes: unpadded, they split over the devices
  with jax.set_mesh(ep_mesh(DEVICES)):
    model = MoeLM(config, rngs=nnx.Rngs(0))
    sampler = dropless(model)
    assert sampler.config.capacity_factor is None and dropless(sampler) is sampler
    logits = []
    for pad in (0, 32, 101):
      window = np.full((1, LM.seq_len), pad, np.int32)
      window[0, :len(prompt)] = prompt
      logits.append(np.asarray(_next_logits(sampler, jnp.asarray(window), len(prompt) - 1)))
    reference = MoeLM(dataclasses.replace(config, capacity_factor=None), rngs=nnx.Rngs(0))
    want = _next_logits(reference, jnp.asarray(prompt[None].astype(np.int32)), len(prompt) - 1)
  for got in logits:
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_checkpoint_round_trip_and_resume(corpus, fused_run, tmp_path):
  half = STEPS // 2
  saver = checkpoint_manager(tmp_path, every=3)
  model, optimizer, history = _run("fused", corpus.train, steps=half, checkpoints=saver)
  saver.close()
  assert len(history) == half

  # Restoring into a differently initialized model gives back exactly the saved state ...
  loader = checkpoint_manager(tmp_path, every=3)
  assert loader.latest_step() == half
  mesh = ep_mesh(DEVICES)
  with jax.set_mesh(mesh):
    other = MoeLM(LM, rngs=nnx.Rngs(1))
    other_optimizer = make_optimizer(other, TRAIN)
    restored_history = restore(loader, other, other_optimizer)
  assert restored_history == history
  assert int(other_optimizer.step[...]) == half
  jax.tree.map(np.testing.assert_array_equal, _params(other), _params(model))
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(other_optimizer)),
               nnx.to_pure_dict(nnx.state(optimizer)))
  loader.close()

  # ... and the resumed run takes exactly the steps the uninterrupted one took.
  _, _, resumed = _run("fused", corpus.train, seed=1,
                       restore_from=checkpoint_manager(tmp_path, every=3))
  assert [r["step"] for r in resumed] == list(range(STEPS))
  np.testing.assert_array_equal(_losses(resumed), _losses(fused_run[2]))


def test_a_checkpoint_of_other_settings_is_refused_before_restoring(tmp_path):
  """Resuming with other settings says which arrays differ and leaves the model as it was
  (Orbax's own error came part-way through restoring, among its shutdown's)."""
  with jax.set_mesh(ep_mesh(DEVICES)):
    model = MoeLM(LM, rngs=nnx.Rngs(0))
    saver = checkpoint_manager(tmp_path, every=1)
    save(saver, 1, model, make_optimizer(model, TRAIN), [], force=True)
    saver.close()
    for other, message in (
        (dataclasses.replace(LM, ffn=48), r"6 arrays differ \(0/blocks/0/ffn/w_in/value: saved "
                                          r"float32\[8, 32, 64\], here float32\[8, 32, 96\]"),
        (dataclasses.replace(LM, layers=2), r"0/blocks/1/\S+: saved nothing, here float32")):
      changed = MoeLM(other, rngs=nnx.Rngs(1))
      before = _params(changed)
      with pytest.raises(ValueError, match=rf"checkpoint 1 in {re.escape(str(tmp_path))} holds "
                                           rf"another model or optimizer than this one: "
                                           rf".*{message}"):
        restore(checkpoint_manager(tmp_path, every=1), changed, make_optimizer(changed, TRAIN))
      jax.tree.map(np.testing.assert_array_equal, _params(changed), before)


@pytest.mark.slow
def test_demo_cli(tmp_path):
  out = tmp_path / "demo"
  command = [sys.executable, "-m", "models.demo", "--steps", "3", "--devices", "4",
             "--experts", "4", "--layers", "1", "--hidden", "32", "--heads", "2", "--ffn", "32",
             "--seq-len", "16", "--batch", "4", "--eval-batches", "1", "--sample-bytes", "4",
             "--max-corpus-bytes", "100000", "--checkpoint-every", "2", "--no-progress",
             "--balance", "bias", "--score", "sigmoid", "--out", str(out)]
  done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "largest loss difference" in done.stdout
  assert "busiest expert over the mean load" in done.stdout
  metrics = json.loads((out / "metrics.json").read_text())
  for dispatch in ("fused", "all_to_all"):
    m = metrics[dispatch]
    assert len(m["losses"]) == 3
    assert {"loss_first", "loss_last", "val_loss", "tokens_per_s"} <= m.keys()
    load = np.asarray(m["expert_load"])  # [L, E]: each expert's share of the assignments
    assert load.shape == (1, 4) and np.allclose(load.sum(1), 1.0, atol=1e-3), load
    assert np.asarray(m["expert_imbalance"]).shape == (1, 2)
  # The paths differ only in float32 summation order (the losses are about 5.5).
  assert metrics["max_loss_diff"] < 1e-4
  assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert (out / "checkpoints" / "fused" / "3").is_dir()


@pytest.mark.parametrize("flags,message", [
    (["--devices", "4", "--seq-len", "30"], "--seq-len 30 must be divisible by --devices 4"),
    (["--devices", "0"], "--devices must be at least 1"),
    (["--devices", "4", "--batch", "6"], "--batch 6 must be divisible by --devices 4"),
    (["--prompt="], "--prompt must hold at least one character"),
    (["--experts", "0"], "--experts must be at least 1"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be at least 1"),
    (["--eval-batches", "0"], "--eval-batches must be at least 1"),
    (["--temperature", "-1"], "--temperature must be at least 0"),
    (["--temperature", "nan"], "--temperature must be at least 0"),
    (["--heads", "3"], "hidden=64 is not divisible by heads=3"),
    (["--k", "9"], "1 <= k=9 <= num_experts=8"),
])
def test_demo_refuses_settings_it_cannot_finish_before_training(flags, message, capsys):
  """A sequence length the devices do not split, an empty prompt or no experts once trained both
  paths and then failed in the sample or the summary, before metrics.json was written."""
  from models import demo
  with pytest.raises(SystemExit):
    demo.parse_args(flags)
  assert message in capsys.readouterr().err


def test_demo_resumes_only_checkpoints_of_its_own_settings(tmp_path):
  """Without --resume both paths' checkpoints go (a path's left from an earlier run was resumed
  as this run's, trained at another learning rate); with it, other training settings are
  refused, and settings that change no training are not."""
  from models import demo
  args = lambda *flags: demo.parse_args(["--out", str(tmp_path), *flags])
  checkpoints = tmp_path / "checkpoints"
  demo.claim_checkpoints(args("--lr", "0.05"))
  (checkpoints / "all_to_all" / "4").mkdir(parents=True)  # an earlier run's, finished
  demo.claim_checkpoints(args())
  assert not (checkpoints / "all_to_all").exists()
  (checkpoints / "fused" / "2").mkdir(parents=True)  # this run's, interrupted
  demo.claim_checkpoints(args("--resume", "--temperature", "0", "--checkpoint-every", "5"))
  assert (checkpoints / "fused" / "2").is_dir()
  for flags, differ in ((["--lr", "0.05"], "--lr 0.01 there, 0.05 here"),
                        (["--steps", "50"], "--steps 100 there, 50 here")):
    with pytest.raises(ValueError, match=f"trained with other settings \\({differ}\\)"):
      demo.claim_checkpoints(args("--resume", *flags))
  assert (checkpoints / "fused" / "2").is_dir()
  # The command line says so as argparse would, before any training.
  with pytest.raises(SystemExit, match="python -m models.demo: error: the checkpoints in "):
    demo.main(["--out", str(tmp_path), "--resume", "--lr", "0.05"])
  (checkpoints / "settings.json").unlink()  # checkpoints of unknown settings
  with pytest.raises(ValueError, match="holds no record of the settings"):
    demo.claim_checkpoints(args("--resume"))


@pytest.mark.parametrize("flags,message", [
    (["--devices", "0"], "--devices must be at least 1"),
    (["--record-batches", "0"], "--record-batches must be at least 1"),
    (["--time-limit", "-5"], "--time-limit must be positive"),
    (["--k", "17"], "--k 17 must be at most --experts 16"),
])
def test_placement_report_refuses_settings_it_cannot_use(flags, message, capsys):
  """--devices 0 divided by zero, and a negative time limit failed only after training."""
  from models import placement_report
  with pytest.raises(SystemExit):
    placement_report.parse_args(flags)
  assert message in capsys.readouterr().err


def test_placement_report_rows_of_one_layer_have_no_transitions():
  """One MoE layer has no transitions between layers: "-" where the means of none were nan."""
  from jax_ccfuser import placement
  from models import placement_report
  args = placement_report.parse_args(["--devices", "2", "--experts", "4", "--layers", "1"])
  ids = jax.random.randint(jax.random.key(0), (64, 2), 0, 4)
  stats = placement.routing_stats([ids], num_experts=4, num_devices=2)
  rows = placement_report.table_rows(args, 3, stats, stats)
  assert len(rows) == 4 and not any("nan" in row for row in rows), rows
  for row in rows:
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "3" and cells[4] == cells[7] == "-", cells
    assert 0 <= float(cells[2]) <= 1 and float(cells[3]) >= 1, cells
