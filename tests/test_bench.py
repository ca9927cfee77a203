"""bench/: the run script's records, the report's README rewrite, the ragged_dot baseline and
the analytic model."""

import dataclasses
import importlib
import itertools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import model, records, report, run
from bench.problem import Config, make_inputs
from bench.programs import CPU_IMPLS, GPU_IMPLS, _dropped_share, gpu_programs
from bench.ragged import ragged_dot_moe, tokamax_ragged_dot
from jax_ccfuser import _extension, reference_moe
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
  # Useful work is the rows a program computed: one that drops rows is credited with the rest.
  config = Config(**recs[0]["config"])
  for r in recs:
    kept = config.useful_flop(True) * (1 - r["dropped_fraction"])
    assert r["fwd_bwd_gflops"] == pytest.approx(kept / r["fwd_bwd_ms"] / 1e6)
  assert any(r["dropped_fraction"] > 0 for r in recs)
  # The devices a run used, where the process has more.
  assert records.device_description(3).startswith("3 simulated CPU devices on ")
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


def test_only_runs_into_bench_results_rewrite_the_readme():
  """`--out DIR` once rewrote the README from DIR: its GPU section, calibration and plots gone."""
  assert run._parse_args([]).report
  for flags in (["--out", "elsewhere"], ["--quick"], ["--no-report"]):
    assert not run._parse_args(flags).report, flags


@pytest.mark.parametrize("tokens", ["abc", "8,,16", "0", "8,-1"])
def test_tokens_must_be_positive_whole_numbers(tokens, capsys):
  with pytest.raises(SystemExit):
    run._parse_args(["--tokens", tokens])
  assert f"expected positive whole numbers separated by commas, got {tokens!r}" in \
      capsys.readouterr().err
  assert run._parse_args(["--tokens", "8,16"]).tokens == (8, 16)


def test_results_folders_are_made_and_counts_refused_on_the_command_line(tmp_path, capsys):
  """A missing `--out` folder is made, and `bench.distributed --samples 0` refused, before
  anything is measured or compiled, not at the write or the median after it."""
  from bench import distributed
  out = tmp_path / "new" / "folder"
  assert records.parser(__doc__).parse_args(["--out", str(out)]).out == out and out.is_dir()
  records.write_whole({"configs": {}}, tmp_path / "other" / "gpu.json")
  assert json.loads((tmp_path / "other" / "gpu.json").read_text()) == {"configs": {}}
  for flags in (["--samples", "0"], ["--tokens", "-3"], ["--tokens", "8,16"]):
    with pytest.raises(SystemExit):
      distributed.main(flags)
    assert "positive whole number" in capsys.readouterr().err, flags
  for field in ("devices", "tokens", "hidden", "ffn", "experts"):
    sizes = dict(devices=2, tokens=4, hidden=8, ffn=8, experts=2, k=1) | {field: 0}
    with pytest.raises(ValueError, match=f"{field}=0 must be at least 1"):
      Config(**sizes)


def test_a_second_run_of_the_day_keeps_the_first_runs_file(quick_run, tmp_path):
  _, recs = quick_run
  first = records.write(recs[:2], tmp_path)
  second = records.write(recs, tmp_path)
  assert second.name == first.name.replace(".json", "-2.json")
  assert json.loads(first.read_text()) == recs[:2]
  assert json.loads((tmp_path / "latest-cpu.json").read_text()) == recs
  assert not list(tmp_path.glob("*.partial"))


def test_results_that_cannot_be_reported_are_named(quick_run, tmp_path):
  _, recs = quick_run
  latest = tmp_path / "latest-cpu.json"
  for content, why in (("[]", "it holds no records"), ('[{"impl": ', "Expecting value"),
                       (json.dumps([r for r in recs if r["impl"] != "fused"]),
                        "no fused record for the configurations")):
    latest.write_text(content)
    with pytest.raises(ValueError, match=f"latest-cpu.json: {why}"):
      records.load_latest(tmp_path)
  latest.unlink()
  # A half-written GPU results file is left out, with a warning; the others still count.
  (tmp_path / "gpu-2026-12-05-abc.json").write_text('{"device": "NVIDIA H2')
  with pytest.warns(UserWarning, match="gpu-2026-12-05-abc.json is not a results file"):
    assert records.newest_gpu_results(tmp_path) is None


def test_the_cpu_goal_is_judged_against_capacity_1_25_only(quick_run):
  _, recs = quick_run
  assert "Goal: " in report.measured_section("cpu", recs)
  without = [r for r in recs if r["impl"] != "all_to_all_cf1.25"]
  assert "Goal: " not in report.measured_section("cpu", without)
  assert "two cores" not in report.measured_section("cpu", recs)  # the device line says


@pytest.mark.parametrize("ragged_dot", [jax.lax.ragged_dot, tokamax_ragged_dot],
                         ids=["jax", "tokamax"])
def test_ragged_dot_baselines_match_reference(ragged_dot):
  config = Config(devices=1, tokens=12, hidden=16, ffn=8, experts=4, k=2, skew=0.5)
  args = make_inputs(config)
  value_and_grads = lambda fn: jax.jit(jax.value_and_grad(
      lambda *a: jnp.sum(fn(*a) ** 2), argnums=(0, 2, 3, 4)))
  baseline = lambda *a: ragged_dot_moe(*a, ragged_dot=ragged_dot)
  (loss, grads), (want_loss, want) = (value_and_grads(baseline)(*args),
                                      value_and_grads(reference_moe)(*args))
  assert_close(loss, want_loss, jnp.float32)
  for g, w in zip(grads, want):
    assert_close(g, w, jnp.float32, scale=10)


def test_gpu_programs_agree_on_the_default_device():
  # The GPU path (emulated peers, both ragged_dots) traced and run on whatever device is here.
  config = Config(devices=2, tokens=8, hidden=16, ffn=8, experts=4, k=2)
  programs = gpu_programs(config)
  assert tuple(programs) == tuple(i for i in GPU_IMPLS
                                  if i != "tokamax_triton" or jax.default_backend() == "gpu")
  fused = programs["fused"]
  for name in ("ragged_dot", "tokamax"):
    other = programs[name]
    assert_close(fused.forward(*fused.inputs(1)), other.forward(*other.inputs(1)), jnp.float32)
    for g, w in zip(fused.forward_backward(*fused.inputs(1)),
                    other.forward_backward(*other.inputs(1))):
      assert_close(g, w, jnp.float32, scale=10)


def test_dropped_share_follows_the_capacity_rule():
  config = Config(devices=2, tokens=4, hidden=1, ffn=1, experts=2, k=1)
  # Capacity ceil(1.25 * 4 / 2) = 3 rows per expert and device: device 0 sends all 4 rows to
  # expert 0 (one dropped), device 1 splits 2/2 (none).
  ids = np.array([[0], [0], [0], [0], [0], [1], [0], [1]], np.int32)
  assert _dropped_share(ids, config, 1.25) == pytest.approx(1 / 8)


# A node and layer small enough to compute by hand (see test_model_hand_computed_example).
# Phases from 500 rows an expert per source: the toy layer's T*K/E.
_NODE = model.Node(name="2xtoy", devices=2, gemm_tflops=1.0, hbm_gbps=1000.0, link_gbps=100.0,
                   link_latency_us=0.0, collective_latency_us=0.0, phase_rows=500)
_LAYER = model.Layer("toy", tokens=1000, hidden=1000, ffn=1000, experts=2, k=1)


def test_model_runs_phases_from_the_cuda_handlers_threshold():
  cuda = _extension.cuda
  if cuda is None:
    pytest.skip("built without the CUDA extension")
  assert model.Node.__dataclass_fields__["phase_rows"].default == cuda.phase_rows


def test_model_hand_computed_example():
  # Rows 1000, each 2 * 1000 * 3000 FLOPs: GEMM 6 ms at 1 TFLOP/s. Half the rows are remote:
  # 500 * 2000 B over 100 GB/s = 10 us per exchange. Permute + unpermute: 4 * 2 MB over
  # 1 TB/s = 8 us.
  assert model.all_to_all_ms(_NODE, _LAYER) == pytest.approx(6.0 + 0.020 + 0.008)
  assert model.all_to_all_ms(_NODE, _LAYER, backward=True) == pytest.approx(
      6.028 + 12.0 + 0.020 + 0.008)
  # Fused: each of the 2000 tokens has its one expert on a given device with chance 1/2, so
  # 1000 rows come in, half remote: the fetch 10 us, under the own rows' GEMM (3 ms on 116 of
  # 132 SMs: 3.414 ms), then the peer's rows' GEMM on all SMs (3 ms); the float32 scatter
  # 20 us; partial sums 1000 * 1000 * 4 B over 1 TB/s = 4 us. Backward: x and dy under h and u
  # (6.414 ms), dW_out, dW_in and dx (10 ms), the dx scatter and the sums.
  pipelined = 3.0 * 132 / 116 + 3.0
  assert model.fused_ms(_NODE, _LAYER) == pytest.approx(pipelined + 0.020 + 0.004)
  assert model.fused_ms(_NODE, _LAYER, backward=True) == pytest.approx(
      pipelined + 0.024 + pipelined + 10.0 + 0.020 + 0.004)
  # No SMs kept for the fetch: it waits for the GEMMs, 6 ms + 10 us.
  unkept = dataclasses.replace(_NODE, fetch_sms=0)
  assert model.fused_ms(unkept, _LAYER) == pytest.approx(6.0 + 0.010 + 0.020 + 0.004)
  # Fewer rows an expert per source than phases need: the same, the GEMMs after the fetch.
  one_phase = dataclasses.replace(_NODE, phase_rows=501)
  assert model.fused_ms(one_phase, _LAYER) == pytest.approx(6.0 + 0.010 + 0.020 + 0.004)
  with pytest.raises(ValueError, match="fetch_sms must leave the GEMMs an SM"):
    dataclasses.replace(_NODE, fetch_sms=132)
  # A link 1000 times slower: the fetch (10 ms) outlasts the own rows' GEMM, then the last 3 ms.
  slow = dataclasses.replace(_NODE, link_gbps=0.1)
  assert model.fused_ms(slow, _LAYER) == pytest.approx(10.0 + 3.0 + 20.0 + 0.004)
  # Capacity 1.25: 1250 padded rows, 7.5 ms GEMM, 12.5 us per exchange, 10 us of permutes.
  assert model.all_to_all_ms(_NODE, _LAYER, capacity_factor=1.25) == pytest.approx(7.535)
  # Skew 1 on 2 devices: the hot device computes T*K + T*(D-1) = 2000 rows, all 2000 tokens'.
  hot = dataclasses.replace(_LAYER, skew=1.0)
  assert model.fused_ms(_NODE, hot) == pytest.approx(2 * pipelined + 0.040 + 0.004)


def test_model_reads_a_token_once_per_device():
  # DeepSeek-V3 on 8 devices: 32 of 256 experts each; a token's 8 distinct experts miss a
  # device with chance C(224, 8) / C(256, 8).
  share = model._distinct_share(model.SHAPES[1], 8)
  miss = 1.0
  for j in range(8):
    miss *= (224 - j) / (256 - j)
  assert share == pytest.approx(1 - miss) and 0.6 < share < 0.7
  # Mixtral: one expert per device, K = 2 distinct experts: 2 of 8 devices per token.
  assert model._distinct_share(model.SHAPES[0], 8) == pytest.approx(2 / 8)


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


def _gpu_results(path, *, device, date, roof, fused, dry_run=False, fused_fetch_sms0=None):
  """A results file in bench/gpu_check.py's shape; its rates are test inputs, not figures."""
  config = {"config": {"tokens": 8, "hidden": 4, "ffn": 4, "experts": 8, "k": 2},
            "impls": {"roof": {"fwd_tflops": roof}, "fused": {"fwd_tflops": fused},
                      "ragged_dot": {"error": "XlaRuntimeError: RESOURCE_EXHAUSTED"}}}
  if fused_fetch_sms0 is not None:
    config["impls"]["fused_fetch_sms0"] = {"fwd_tflops": fused_fetch_sms0}
  path.write_text(json.dumps({"device": device, "date": date, "dry_run": dry_run,
                              "benchmark": {"device": device, "configs": {"a": config}}}))


def test_model_calibrates_on_the_newest_gpu_results_file(tmp_path):
  nominal = model.calibrate(model.H200, tmp_path)  # no results: the stated rates
  assert nominal == dataclasses.replace(
      model.H200, basis=f"{model.H200.basis} (no GPU results file to calibrate on)")
  _gpu_results(tmp_path / "gpu-2026-12-01-aaa.json", device="NVIDIA H200",
               date="2026-12-01T10:00:00+00:00", roof=300.0, fused=30.0)
  _gpu_results(tmp_path / "gpu-2026-12-02-bbb.json", device="NVIDIA H200",
               date="2026-12-02T10:00:00+00:00", roof=400.0, fused=200.0)
  _gpu_results(tmp_path / "gpu-2026-12-03-ccc.json", device="NVIDIA H200",
               date="2026-12-03T10:00:00+00:00", roof=1.0, fused=1.0, dry_run=True)
  h200 = model.calibrate(model.H200, tmp_path)
  assert h200.gemm_tflops == pytest.approx(400.0) and h200.fused_efficiency == pytest.approx(0.5)
  assert h200.basis == "calibrated on gpu-2026-12-02-bbb.json"
  assert h200.link_gbps == model.H200.link_gbps  # one GPU measures no link
  # No H100 file: the H200's SMs are the H100's, so the kernels' share of the roof carries
  # over: the H100 rows do not run fused at the roof's rate beside the H200 rows at half of it.
  h100 = model.calibrate(model.H100, tmp_path)
  assert h100 == dataclasses.replace(
      model.H100, fused_efficiency=0.5,
      basis=f"{model.H100.basis}; fused GEMM efficiency from gpu-2026-12-02-bbb.json (the same "
            f"SMs)")
  assert model.calibrate(model.A100, tmp_path).fused_efficiency == 1.0  # other SMs
  # The GEMMs' efficiency on every SM, where the file times fused with none kept for the fetch.
  _gpu_results(tmp_path / "gpu-2026-12-04-ddd.json", device="NVIDIA H200",
               date="2026-12-04T10:00:00+00:00", roof=400.0, fused=200.0, fused_fetch_sms0=240.0)
  assert model.calibrate(model.H200, tmp_path).fused_efficiency == pytest.approx(0.6)
  # Per shape, then the median: shapes' roofs differ (the ratio of medians mixed shapes).
  doc = json.loads((tmp_path / "gpu-2026-12-04-ddd.json").read_text())
  shapes = doc["benchmark"]["configs"]
  for name, (roof, fused) in {"a": (400.0, 200.0), "b": (100.0, 80.0), "c": (300.0, 90.0)}.items():
    shapes[name] = {"config": shapes["a"]["config"],
                    "impls": {"roof": {"fwd_tflops": roof}, "fused": {"fwd_tflops": fused}}}
  doc["date"] = "2026-12-05T10:00:00+00:00"
  (tmp_path / "gpu-2026-12-05-eee.json").write_text(json.dumps(doc))
  calibrated = model.calibrate(model.H200, tmp_path)
  assert calibrated.fused_efficiency == pytest.approx(0.5)  # median of 0.5, 0.8, 0.3
  assert calibrated.gemm_tflops == pytest.approx(300.0)

def test_report_renders_the_newest_gpu_results_file(tmp_path):
  assert "No GPU results file yet" in report.gpu_section(tmp_path)
  timed = lambda ms, tflops, roof: {"fwd_ms": ms / 3, "fwd_bwd_ms": ms,
                                    "fwd_tflops": tflops, "fwd_bwd_tflops": tflops,
                                    "fwd_bwd_roof_fraction": roof,
                                    "fwd_bwd_peak_bytes": 2**30}
  # Test inputs in bench/gpu_check.py's shape, not measurements.
  doc = {"device": "NVIDIA H200", "driver": "1.0", "jax": "0.11.2", "commit": "abc1234",
         "date": "2026-12-02T10:00:00+00:00", "dry_run": False,
         "tests": {"passed": 40, "failed": 2, "errors": 0, "skipped": 1},
         "sanitizer": {"memcheck": {"findings": 0, "errors": 0, "warnings": 0},
                       "initcheck": {"findings": 3, "errors": 3, "warnings": 0,
                                     "printed_in": {"input_reduce_fusion": 3}},
                       "racecheck": None,
                       "synccheck": {"findings": None, "errors": None, "warnings": None}},
         "benchmark": {"device": "NVIDIA H200", "configs": {"Qwen3-30B-A3B": {
             "config": {"tokens": 1024, "hidden": 2048, "ffn": 768, "experts": 128, "k": 8},
             "fused_scratch_bytes": {"fwd": 2**30, "bwd": 3 * 2**30},
             "impls": {"fused": timed(2.0, 300.0, 0.5), "ragged_dot": timed(8.0, 75.0, 0.125),
                       "tokamax": {"error": "ModuleNotFoundError: No module named 'tokamax'"},
                       "roof": timed(1.0, 600.0, 1.0)}}}}}
  (tmp_path / "gpu-2026-12-02-abc1234.json").write_text(json.dumps(doc))
  text = report.gpu_section(tmp_path)
  assert "gpu-2026-12-02-abc1234.json" in text and "40 passed, 2 failed" in text
  assert "memcheck 0 findings (0 errors, 0 warnings)" in text
  assert "initcheck 3 findings (3 errors, 0 warnings; printed ones in `input_reduce_fusion` 3)" \
      in text
  # A sanitizer stage skipped, or stopped before the tool's summary, has no counts to show.
  for tool in ("racecheck", "synccheck"):
    assert f"{tool} no summary (its stage was skipped, or stopped before" in text
  rows = [line for line in text.splitlines() if line.startswith("| Qwen3-30B-A3B")]
  assert [row.split(" | ")[2] for row in rows] == ["fused", "ragged_dot", "tokamax", "roof"]
  assert "| 0.67 | 2.00 | 300 | 50% |  | 1.00 | 1.00 / 3.00 |" in rows[0]
  assert "| 4.00x |" in rows[1] and "not run: ModuleNotFoundError" in rows[2]
  assert report.plot_gpu(doc, tmp_path).stat().st_size > 0


def test_provenance_names_every_commit_of_a_run():
  """A commit made while a script measured gave its later rows another commit; the table's
  sentence named the first only."""
  rec = lambda commit, date: {"commit": commit, "date": date}
  assert records.provenance([rec("a1", "d1"), rec("a1", "d2")]) == "Commit `a1`, d1"
  assert (records.provenance([rec("a1", "d1"), rec("a1", "d2"), rec("b2", "d3")])
          == "Commits `a1` (2 rows), `b2` (1 row), d1 to d3")


@pytest.mark.parametrize("module,results", [("residuals", "residuals-cpu.json"),
                                            ("traffic", "traffic-cpu.json"),
                                            ("reassign", "reassign-cpu.json"),
                                            ("distributed", "distributed-cpu.json")])
def test_the_readme_shows_the_committed_measurements(module, results):
  """Each measuring script's README table is its results file's, as the script writes it (the
  keep-or-recompute table was once pasted by hand, without its commit or date)."""
  module = importlib.import_module(f"bench.{module}")
  recs = json.loads((records.RESULTS_DIR / results).read_text())
  shown = report.README.read_text().split(module.START, 1)[1].split(module.END, 1)[0]
  assert shown.strip() == module.section(recs).strip()


# Each script run as `python -m` with each flag, in one process (a process a run took 2 s each).
_COMMAND_LINES = """
import contextlib, io, json, runpy, sys
results = []
for module in ("report", "traffic", "reassign", "residuals", "distributed"):
  for flag in ("--help", "--no-such-flag"):
    sys.argv, out = [module, flag], io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
      try:
        runpy.run_module(f"bench.{module}", run_name="__main__")
        code = None
      except SystemExit as stop:
        code = stop.code
    results.append([module, flag, code, out.getvalue()])
print(json.dumps(results))
"""


def test_help_measures_and_writes_nothing():
  """`--help` (or any unknown flag) on a script that rewrites the README and bench/results
  stops at its command line, as `bench.run` does; they once ignored their arguments and ran."""
  watched = [report.README, *records.RESULTS_DIR.iterdir()]
  before = {path: path.stat().st_mtime_ns for path in watched}
  run = subprocess.run([sys.executable, "-c", _COMMAND_LINES], capture_output=True, text=True,
                       timeout=300, cwd=report.README.parent)
  assert run.returncode == 0, run.stderr[-3000:]
  results = json.loads(run.stdout.splitlines()[-1])
  assert len(results) == 10
  for module, flag, code, output in results:
    assert code == (0 if flag == "--help" else 2), (module, flag, code, output[-2000:])
    assert "usage:" in output, (module, flag, output[-2000:])
  assert {path: path.stat().st_mtime_ns for path in watched} == before
