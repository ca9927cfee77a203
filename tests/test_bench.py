"""bench/: the run script's records, the report's README rewrite, the ragged_dot baseline and
the analytic model."""

import dataclasses
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import model, records, report, run
from bench.problem import Config, make_inputs
from bench.programs import CPU_IMPLS, GPU_IMPLS, _dropped_share, gpu_programs
from bench.ragged import ragged_dot_moe
from jax_ccfuser import reference_moe
from moe_cases import assert_close


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  recs = run.main(["--quick", "--sweeps", "tokens", "--tokens", "8", "--out", str(out)])
  return out, recs


def test_quick_run_writes_well_formed_records(quick_run):
  out, recs = quick_run
  assert [r["impl"] for r in recs] == list(CPU_IMPLS)
  for r in recs:
    records.check(r)
    assert r["platform"] == "cpu" and r["config"]["devices"] == 8 and r["config"]["tokens"] == 8
    assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["peak_bytes"] > 0
    assert r["activation_bytes"] >= 0 and r["samples"] >= 1
  roof = next(r for r in recs if r["impl"] == "roof")
  assert roof["roof_fraction"] == pytest.approx(1.0)
  (dated,) = [p for p in out.glob("cpu-*.json")]
  assert json.loads(dated.read_text()) == json.loads((out / "latest-cpu.json").read_text())


def test_report_plots_and_rewrites_only_its_section(quick_run, tmp_path):
  out, _ = quick_run
  readme = tmp_path / "README.md"
  readme.write_text("# title\n\nintro\n")
  report.regenerate(out, readme)
  assert all((out / f"cpu-{name}.png").stat().st_size > 0 for name in ("time", "ratios", "memory"))
  text = readme.read_text()
  assert text.startswith("# title\n\nintro\n\n## Benchmarks\n\n" + report.START)
  assert "| 8 | 8 | 2 | 0 |" in text and "Modeled (not measured)" in text
  edited = text.replace("intro", "intro edited by someone else") + "\n## Later section\n"
  readme.write_text(edited)
  report.regenerate(out, readme)
  assert readme.read_text() == edited
  assert readme.read_text().count(report.START) == 1


def test_records_check_rejects_missing_fields_and_bad_times():
  good = dict(platform="cpu", device="d", commit="c", date="t", impl="fused", fwd_ms=1.0,
              fwd_bwd_ms=2.0, peak_bytes=3,
              config=dict(devices=8, tokens=8, hidden=4, ffn=4, experts=8, k=2,
                          dtype="float32", skew=0.0))
  records.check(good)
  with pytest.raises(ValueError, match="config.skew"):
    records.check(dict(good, config={k: v for k, v in good["config"].items() if k != "skew"}))
  with pytest.raises(ValueError, match="non-positive"):
    records.check(dict(good, fwd_bwd_ms=0.0))


def test_ragged_dot_baseline_matches_reference():
  config = Config(devices=1, tokens=12, hidden=16, ffn=8, experts=4, k=2, skew=0.5)
  args = make_inputs(config)
  value_and_grads = lambda fn: jax.jit(jax.value_and_grad(
      lambda *a: jnp.sum(fn(*a) ** 2), argnums=(0, 2, 3, 4)))
  (loss, grads), (want_loss, want) = (value_and_grads(ragged_dot_moe)(*args),
                                      value_and_grads(reference_moe)(*args))
  assert_close(loss, want_loss, jnp.float32)
  for g, w in zip(grads, want):
    assert_close(g, w, jnp.float32, scale=10)


def test_gpu_programs_agree_on_the_default_device():
  # The GPU path (emulated peers, ragged_dot) traced and run on whatever device is here.
  config = Config(devices=2, tokens=8, hidden=16, ffn=8, experts=4, k=2)
  programs = gpu_programs(config)
  assert tuple(programs) == GPU_IMPLS
  fused, ragged = (programs[name] for name in ("fused", "ragged_dot"))
  assert_close(fused.forward(*fused.inputs(1)), ragged.forward(*ragged.inputs(1)), jnp.float32)
  for g, w in zip(fused.forward_backward(*fused.inputs(1)),
                  ragged.forward_backward(*ragged.inputs(1))):
    assert_close(g, w, jnp.float32, scale=10)


def test_dropped_share_follows_the_capacity_rule():
  config = Config(devices=2, tokens=4, hidden=1, ffn=1, experts=2, k=1)
  # Capacity ceil(1.25 * 4 / 2) = 3 rows per expert and device: device 0 sends all 4 rows to
  # expert 0 (one dropped), device 1 splits 2/2 (none).
  ids = np.array([[0], [0], [0], [0], [0], [1], [0], [1]], np.int32)
  assert _dropped_share(ids, config, 1.25) == pytest.approx(1 / 8)


# A node and layer small enough to compute by hand (see test_model_hand_computed_example).
_NODE = model.Node(name="2xtoy", devices=2, gemm_tflops=1.0, hbm_gbps=1000.0, link_gbps=100.0,
                   link_latency_us=0.0, collective_latency_us=0.0)
_LAYER = model.Layer("toy", tokens=1000, hidden=1000, ffn=1000, experts=2, k=1)


def test_model_hand_computed_example():
  # Rows 1000, each 2 * 1000 * 3000 FLOPs: GEMM 6 ms at 1 TFLOP/s. Half the rows are remote:
  # 500 * 2000 B over 100 GB/s = 10 us per exchange. Permute + unpermute: 4 * 2 MB over
  # 1 TB/s = 8 us. Fused: a 128-row tile's fill 2.56 us; partial sums 1000 * 1000 * 4 B over
  # 1 TB/s = 4 us.
  assert model.all_to_all_ms(_NODE, _LAYER) == pytest.approx(6.0 + 0.020 + 0.008)
  assert model.all_to_all_ms(_NODE, _LAYER, backward=True) == pytest.approx(
      6.028 + 12.0 + 0.020 + 0.008)
  assert model.fused_ms(_NODE, _LAYER) == pytest.approx(6.0 + 0.00256 + 0.004)
  assert model.fused_ms(_NODE, _LAYER, backward=True) == pytest.approx(
      6.00656 + 18.0 + 0.00256 + 0.004)
  # Capacity 1.25: 1250 padded rows, 7.5 ms GEMM, 12.5 us per exchange, 10 us of permutes.
  assert model.all_to_all_ms(_NODE, _LAYER, capacity_factor=1.25) == pytest.approx(7.535)
  # Skew 1 on 2 devices: the hot device computes T*K + T*(D-1) = 2000 rows.
  hot = dataclasses.replace(_LAYER, skew=1.0)
  assert model.fused_ms(_NODE, hot) == pytest.approx(12.0 + 0.00256 + 0.004)


def _model_times(node, layer):
  return [fn(node, layer, backward=b) for b in (False, True)
          for fn in (model.all_to_all_ms, model.fused_ms,
                     lambda n, l, backward: model.all_to_all_ms(
                         n, l, capacity_factor=1.25, backward=backward))]


@pytest.mark.parametrize("node,layer", list(itertools.product(
    (model.H100, model.A100, _NODE), (*model.SHAPES, _LAYER))))
def test_model_is_monotone(node, layer):
  base = _model_times(node, layer)
  for faster in (dict(link_gbps=2 * node.link_gbps), dict(gemm_tflops=2 * node.gemm_tflops),
                 dict(hbm_gbps=2 * node.hbm_gbps), dict(link_latency_us=0.0,
                                                        collective_latency_us=0.0)):
    better = _model_times(dataclasses.replace(node, **faster), layer)
    assert all(b <= a for a, b in zip(base, better)), faster
  for skew in (0.25, 0.5, 1.0):
    skewed = _model_times(node, dataclasses.replace(layer, skew=skew))
    assert all(s >= a for a, s in zip(base, skewed)), skew
  assert all(t > 0 for t in base)


def test_model_calibrates_on_gpu_records(tmp_path):
  assert model.calibrate(model.H100, tmp_path) == model.H100  # no results: nominal
  recs = [dict(device="NVIDIA H100 80GB HBM3", impl="roof", useful_gflop=100.0, fwd_ms=0.25),
          dict(device="NVIDIA H100 80GB HBM3", impl="fused", useful_gflop=100.0, fwd_ms=0.5),
          dict(device="NVIDIA H100 80GB HBM3", impl="ragged_dot", useful_gflop=100.0,
               fwd_ms=5.0)]
  (tmp_path / "latest-gpu.json").write_text(json.dumps(recs))
  h100 = model.calibrate(model.H100, tmp_path)
  assert h100.gemm_tflops == pytest.approx(400.0) and h100.fused_efficiency == pytest.approx(0.5)
  assert h100.basis.startswith("calibrated")
  assert model.calibrate(model.A100, tmp_path) == model.A100  # no A100 records
