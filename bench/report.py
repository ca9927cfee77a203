"""`python -m bench.report`: plots and the README's benchmark section from the result records.

Reads `bench/results/latest-<platform>.json` and the newest `gpu-*.json` (bench/gpu_check.py's
results file), writes `bench/results/<platform>-time.png`, `-ratios.png`, `-memory.png` and
`gpu-tflops.png`, and rewrites README.md between `<!-- bench:start -->` and `<!-- bench:end -->`
(appending a "## Benchmarks" section with those markers if absent), with the measured tables and
the modelled 8xH100 / 8xH200 / 8xA100 table from `bench.model`.
"""

import argparse
import pathlib

import matplotlib

matplotlib.use("Agg")  # files only; no display on benchmark machines
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from bench import gpu_check, model, records  # noqa: E402

README = pathlib.Path(__file__).parent.parent / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
_FUSED, _ROOF = "fused", "roof"
_CAPPED = "all_to_all_cf1.25"  # the baseline the CPU goal is set against
_MIB = 2**20


def _by_config(recs: list[dict]) -> dict[tuple, dict[str, dict]]:
  """`{config key: {impl: record}}`, in run order."""
  out = {}
  for r in recs:
    out.setdefault(records.config_key(r), {})[r["impl"]] = r
  return out


def _impls(recs: list[dict]) -> list[str]:
  """Implementations in run order (fused first, roof last, as the run lists them)."""
  return list(dict.fromkeys(r["impl"] for r in recs))


def _baselines(recs):
  return [i for i in _impls(recs) if i not in (_FUSED, _ROOF)]


def _sweeps(recs: list[dict]) -> dict[str, tuple[str, list[dict]]]:
  """`{sweep: (the config field it varies, its records)}`."""
  sweeps = {}
  for r in recs:
    for s in r.get("sweeps", ["all"]):
      sweeps.setdefault(s, []).append(r)
  out = {}
  for name, rs in sweeps.items():
    varying = [f for f in records.CONFIG_FIELDS if len({r["config"][f] for r in rs}) > 1]
    out[name] = (varying[0] if varying else "tokens", rs)
  return out


def _series(rs, impl, field, value):
  """Sorted `(x, value(record))` of one implementation along a sweep's field."""
  points = sorted((r["config"][field], value(r)) for r in rs if r["impl"] == impl)
  return [p[0] for p in points], [p[1] for p in points]


def _speedup(group: dict, baseline: str, field: str = "fwd_bwd_ms") -> float:
  return group[baseline][field] / group[_FUSED][field]


def plot(plat: str, recs: list[dict], out_dir: pathlib.Path) -> list[pathlib.Path]:
  """Writes the time, ratio and memory plots of one platform; returns their paths."""
  sweeps = _sweeps(recs)
  impls = _impls(recs)
  paths = []

  def figure(name, draw, ylabel, logy):
    fig, axes = plt.subplots(1, len(sweeps), figsize=(4.2 * len(sweeps), 3.6), squeeze=False)
    for ax, (sweep, (field, rs)) in zip(axes[0], sweeps.items()):
      draw(ax, field, rs)
      ax.set_xlabel(f"{field} ({sweep} sweep)")
      ax.set_ylabel(ylabel)
      ax.grid(alpha=0.3)
      if logy:
        ax.set_yscale("log")
      if field == "tokens":
        ax.set_xscale("log", base=2)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{recs[0]['device']}, commit {recs[0]['commit']}", fontsize=8)
    fig.tight_layout()
    path = out_dir / f"{plat}-{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

  def times(ax, field, rs):
    for impl in impls:
      line, = ax.plot(*_series(rs, impl, field, lambda r: r["fwd_bwd_ms"]), "o-",
                      label=f"{impl} fwd+bwd")
      ax.plot(*_series(rs, impl, field, lambda r: r["fwd_ms"]), "x--", color=line.get_color(),
              alpha=0.6, label=f"{impl} fwd")

  def ratios(ax, field, rs):
    groups = sorted(_by_config(rs).values(), key=lambda g: g[_FUSED]["config"][field])
    for baseline in _baselines(rs):
      ax.plot([g[_FUSED]["config"][field] for g in groups], [_speedup(g, baseline) for g in groups],
              "o-", label=f"fused speed-up over {baseline}")
    ax.plot(*_series(rs, _FUSED, field, lambda r: r["roof_fraction"]), "s-k",
            label="fused / roof")
    ax.axhline(1.2, color="gray", ls=":", lw=1)
    ax.axhline(0.6, color="gray", ls="--", lw=1)

  def memory(ax, field, rs):
    for impl in impls:
      ax.plot(*_series(rs, impl, field, lambda r: r["activation_bytes"] / _MIB), "o-",
              label=impl)

  figure("time", times, "ms (median)", logy=True)
  figure("ratios", ratios, "ratio, forward+backward", logy=True)
  figure("memory", memory, "activation MiB / device (XLA temp)", logy=True)
  return paths


def _fmt_ms(r: dict | None) -> str:
  return "—" if r is None else f"{r['fwd_ms']:.1f} / {r['fwd_bwd_ms']:.1f}"


def _config_cells(c: dict) -> str:
  return f"{c['tokens']} | {c['experts']} | {c['k']} | {c['skew']:g}"


def measured_section(plat: str, recs: list[dict]) -> str:
  """Markdown for one platform's records: provenance, the goal check and the table."""
  first = recs[0]
  impls, baselines = _impls(recs), _baselines(recs)
  groups = _by_config(recs)
  largest = max(groups.values(), key=lambda g: g[_FUSED]["useful_gflop"])
  lc = largest[_FUSED]["config"]
  lines = [
      f"### Measured: {plat.upper()}, {first['device']}",
      "",
      f"{records.provenance(recs)}; {lc['dtype']}, H={lc['hidden']}, "
      f"F={lc['ffn']} (SwiGLU), D={lc['devices']}. Each cell is the median of at least "
      f"{min(r['samples'] for r in recs)} samples taken round-robin across the "
      "implementations after a dropped first one, with fresh inputs each time.",
      "",
  ]
  if plat == "cpu":
    lines += [
        "The simulated devices share the cores named above (and whatever else the machine "
        "runs), so absolute times are noisy; the ratios compare implementations measured side "
        "by side in the same rounds.",
        "",
    ]
  f = largest[_FUSED]
  summary = (f"**Largest configuration** (T={lc['tokens']}, E={lc['experts']}, K={lc['k']}, "
             f"forward+backward): fused {f['fwd_bwd_ms']:.1f} ms, "
             f"{100 * f['roof_fraction']:.0f}% of the roof")
  for b in baselines:
    if b in largest:
      summary += (f"; {_speedup(largest, b):.2f}x {b} "
                  f"(activation {f['activation_bytes'] / _MIB:.1f} vs "
                  f"{largest[b]['activation_bytes'] / _MIB:.1f} MiB)")
  summary += (". By process CPU time instead of wall clock: "
              f"{100 * f['cpu_roof_fraction']:.0f}% of the roof, "
              + ", ".join(f"{_speedup(largest, b, 'fwd_bwd_cpu_ms'):.2f}x {b}"
                          for b in baselines if b in largest))
  if plat == "cpu" and _CAPPED in largest:
    met = [_speedup(largest, _CAPPED) >= 1.2, f["roof_fraction"] >= 0.6,
           all(f["activation_bytes"] < largest[b]["activation_bytes"] for b in baselines
               if b in largest)]
    verdict = lambda ok: "met" if ok else "missed"
    summary += (f". Goal: {verdict(all(met))} (>= 1.2x capacity 1.25: {verdict(met[0])}; "
                f">= 60% of the roof: {verdict(met[1])}; less activation memory than either "
                f"baseline: {verdict(met[2])}).")
  lines += [summary, ""]
  speedup_heads = " | ".join(f"fused vs {b}" for b in baselines)
  lines += [
      "Times in ms (wall clock), forward / forward+backward. Speed-ups and % of roof are "
      "forward+backward; % roof (CPU) compares process CPU time instead, which other processes "
      "on the machine disturb less (but which counts spin-waits). "
      "Activation: XLA's temp bytes per device of the forward+backward program "
      "(`memory_analysis().temp_size_in_bytes`: intermediates, exchange buffers, residuals), "
      "MiB. XLA cannot see what a custom call allocates on the host heap by itself: the fused "
      "handler's scratch (gathered rows, tile panels; for 16-bit weights, float32 "
      "weight-gradient accumulators) comes on top of its figure.",
      "",
      "| T | E | K | skew | " + " | ".join(impls) + f" | {speedup_heads} | fused % roof | fused % roof (CPU) | "
      "activation " + " / ".join(i for i in impls if i != _ROOF) + " | drops (cf) |",
      "|" + "---|" * (4 + len(impls) + len(baselines) + 4),
  ]
  for g in groups.values():
    c = g[_FUSED]["config"]
    drops = max(r.get("dropped_fraction", 0.0) for r in g.values())
    lines.append(
        f"| {_config_cells(c)} | " + " | ".join(_fmt_ms(g.get(i)) for i in impls)
        + " | " + " | ".join(f"{_speedup(g, b):.2f}x" if b in g else "—" for b in baselines)
        + f" | {100 * g[_FUSED]['roof_fraction']:.0f}% "
        + f"| {100 * g[_FUSED]['cpu_roof_fraction']:.0f}% | "
        + " / ".join(f"{g[i]['activation_bytes'] / _MIB:.2f}" if i in g else "—"
                     for i in impls if i != _ROOF)
        + f" | {100 * drops:.1f}% |")
  lines += [""] + [f"![{plat} {name}](bench/results/{plat}-{name}.png)"
                   for name in ("time", "ratios", "memory")] + [""]
  return "\n".join(lines)


_GPU_PLOT = "gpu-tflops.png"


def plot_gpu(doc: dict, out_dir: pathlib.Path) -> pathlib.Path:
  """Forward+backward useful TFLOP/s of every implementation and shape of a GPU results
  document, the roof's as a line per shape; returns the plot's path."""
  configs = doc["benchmark"]["configs"]
  impls = list(dict.fromkeys(i for c in configs.values() for i in c["impls"] if i != _ROOF))
  fig, ax = plt.subplots(figsize=(7.5, 3.6))
  width = 0.8 / max(len(impls), 1)
  for j, impl in enumerate(impls):
    values = [c["impls"].get(impl, {}).get("fwd_bwd_tflops", 0.0) for c in configs.values()]
    ax.bar([i + j * width for i in range(len(configs))], values, width, label=impl)
  for i, c in enumerate(configs.values()):
    roof = c["impls"].get(_ROOF, {}).get("fwd_bwd_tflops")
    if roof:
      ax.hlines(roof, i - width / 2, i + 0.8 - width / 2, colors="k", linestyles="--",
                label=_ROOF if i == 0 else None)
  ax.set_xticks([i + 0.4 - width / 2 for i in range(len(configs))], list(configs), fontsize=8)
  ax.set_ylabel("useful TFLOP/s, forward+backward")
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=7)
  ax.set_title(f"{doc['device']}, commit {doc['commit']}, {doc['date'][:10]}", fontsize=8)
  fig.tight_layout()
  path = out_dir / _GPU_PLOT
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def gpu_section(results_dir: pathlib.Path) -> str:
  """Markdown for the newest GPU results file: its checks and its benchmark table."""
  found = records.newest_gpu_results(results_dir)
  lines = ["### Measured on a GPU (one device, D = 8 emulated peers)", ""]
  if found is None:
    return "\n".join(lines + [
        "No GPU results file yet: the CUDA path has not run on a GPU. `bash bench/gpu_check.sh` "
        "on a GPU machine writes `bench/results/gpu-<date>-<commit>.json`, and this section is "
        "generated from the newest one.", ""])
  path, doc = found
  tests = doc.get("tests") or {}
  lines += [
      f"From `bench/results/{path.name}`: {doc['device']}, driver {doc.get('driver')}, jax "
      f"{doc.get('jax')}, commit {doc['commit']}, {doc['date'][:10]}. CUDA tests: "
      f"{tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, "
      f"{tests.get('errors', 0)} errors, {tests.get('skipped', 0)} skipped; compute-sanitizer: "
      + (", ".join(f"{tool} {gpu_check.sanitizer_summary(found, code='`')}"
                   for tool, found in (doc.get("sanitizer") or {}).items()) or "not run")
      + ". Every figure below "
      "was measured on that machine (medians; `tokamax` is tokamax's `ragged_dot` in the same "
      "sort/unsort wrapper).",
      "",
      *([doc["reruns"], ""] if doc.get("reruns") else []),
      "| layer (H, F, E, K) | T | impl | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s | % roof | "
      "fused speed-up | XLA peak GiB | fused scratch GiB (fwd / bwd) |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, c in doc["benchmark"]["configs"].items():
    cfg, impls = c["config"], c["impls"]
    fused = impls.get(_FUSED, {})
    scratch = c.get("fused_scratch_bytes")
    for impl, f in impls.items():
      head = f"| {name} ({cfg['hidden']}, {cfg['ffn']}, {cfg['experts']}, {cfg['k']}) | " \
             f"{cfg['tokens']} | {impl} |"
      if "error" in f:
        lines.append(f"{head} not run: {f['error'][:80]} | | | | | | |")
        continue
      speedup = (f"{f['fwd_bwd_ms'] / fused['fwd_bwd_ms']:.2f}x"
                 if impl != _FUSED and "fwd_bwd_ms" in fused else "")
      roof = (f"{100 * f['fwd_bwd_roof_fraction']:.0f}%" if "fwd_bwd_roof_fraction" in f
              else "")
      memory = f"{f['fwd_bwd_peak_bytes'] / 2**30:.2f}"
      extra = (f"{scratch['fwd'] / 2**30:.2f} / {scratch['bwd'] / 2**30:.2f}"
               if impl == _FUSED and scratch else "")
      lines.append(f"{head} {f['fwd_ms']:.2f} | {f['fwd_bwd_ms']:.2f} | "
                   f"{f['fwd_bwd_tflops']:.0f} | {roof} | {speedup} | {memory} | {extra} |")
  lines += ["", "Speed-up: the implementation's forward+backward time over fused's (above 1: "
            "fused is faster)."]
  lines += _roof_caveat(doc) + _kernel_lines(doc)
  lines += ["", f"![gpu tflops](bench/results/{_GPU_PLOT})", ""]
  return "\n".join(lines)


def _short_kernel(name: str) -> str:
  """A kernel's name without its template arguments and parameters."""
  if name.startswith("_ZN7cutlass13device_kernel"):
    return "cutlass grouped GEMM"
  base = name.split("(")[0].split("<")[0]
  return base.removeprefix("void ").removeprefix("ccf::cuda::")


def _roof_caveat(doc: dict) -> list[str]:
  """A warning where the run's roof multiplied its backward in TF32 (the kernels stage's
  names say so): its forward+backward % roof then overstates fused's share of a bfloat16 roof."""
  configs = (doc.get("kernels") or {}).get("configs", {})
  if not any("tf32" in k["name"] for c in configs.values()
             for k in c.get("roof_fwd_bwd", {}).get("kernels", [])):
    return []
  return ["", "**This run's roof is too slow backward:** its forward+backward multiplied the "
          "backward's GEMMs in TF32 (float32 cotangents, fixed after this run), so its fwd+bwd "
          "% roof overstates fused's share of a bfloat16 roof; its forward is a bfloat16 GEMM."]


def _kernel_lines(doc: dict, top: int = 6) -> list[str]:
  """Where the fused forward+backward's GPU time went per shape (the kernels stage)."""
  configs = (doc.get("kernels") or {}).get("configs", {})
  lines = []
  for name, record in configs.items():
    found = record.get("fused_fwd_bwd", {})
    if "kernels" not in found:
      continue
    parts = ", ".join(f"{_short_kernel(k['name'])} {k['ms']:.2f}" for k in found["kernels"][:top])
    lines.append(f"- {name}: fused fwd+bwd kernels {found['busy_ms']:.2f} ms busy of "
                 f"{found['wall_ms']:.2f} ms: {parts} (ms per call)")
  if lines:
    lines = ["", "Where fused's GPU time went (`bench.kernels`, CUPTI through jax's profiler, "
             "longest kernels first):", ""] + lines
  return lines


def modeled_section(results_dir: pathlib.Path) -> str:
  """Markdown for the analytic model's 8xH100 / 8xH200 / 8xA100 table and its assumptions."""
  nodes = [model.calibrate(n, results_dir) for n in (model.H100, model.H200, model.A100)]
  lines = [
      "### Modeled (not measured): 8xH100, 8xH200 and 8xA100",
      "",
      "From `bench/model.py`: one layer, bfloat16, tokens per device as listed; skew = share "
      "of tokens that all pick one hot expert. Assumptions:",
      "",
  ]
  for n in nodes:
    lines.append(f"- {n.name}: GEMM {n.gemm_tflops:.0f} TFLOP/s, HBM {n.hbm_gbps:.0f} GB/s, "
                 f"peer link {n.link_gbps:.0f} GB/s per direction (achieved), "
                 f"{n.link_latency_us:g} us per barrier step, {n.collective_latency_us:g} us per "
                 f"all_to_all, fused GEMM efficiency {n.fused_efficiency:.2f}, {n.sms} SMs of "
                 f"which {n.fetch_sms} kept for the fetch; {n.basis}.")
  lines += [
      "- all_to_all: exact-size exchanges (dropless) or buffers padded to 1.25 T*K rows "
      "(drops under skew), no overlap of exchange and GEMM; permute and unpermute as HBM "
      "passes; its grouped GEMMs at the GEMM rate itself (no GPU measures that baseline's "
      "grouped GEMM here: its best case).",
      "- fused, as the CUDA path is built: the dispatch reads each (token, device) row once, "
      "source by source under the grouped GEMMs of the rows already fetched, which run on the "
      "SMs not kept for the fetch until the last source's rows are in (max(GEMM (D-1)/D * "
      "SMs / (SMs - fetch SMs), fetch) + GEMM / D; the kept SMs are assumed to read the link "
      "at its rate); then the scatter sends one float32 row per (token, device), not "
      "overlapped; two barriers and the partial-sum pass; backward fetches x and dy under the "
      "h and u products and recomputes h (11/3 of the forward FLOPs for forward+backward "
      "against the baseline's 3).",
      "- Not modelled: launch gaps, the router, activation traffic, link contention.",
      "",
      "| node | layer (H, F, E, K) | T | skew | all_to_all ms | all_to_all_cf1.25 ms | "
      "fused ms | fused vs all_to_all | fused vs cf1.25 |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for row in model.table(nodes):
    lay, ms = row["layer"], row["ms"]
    fmt = lambda pair: f"{pair[0]:.2f} / {pair[1]:.2f}"
    lines.append(
        f"| {row['node']} | {lay.name} ({lay.hidden}, {lay.ffn}, {lay.experts}, {lay.k}) | "
        f"{lay.tokens} | {lay.skew:g} | {fmt(ms['all_to_all'])} | "
        f"{fmt(ms['all_to_all_cf1.25'])} | {fmt(ms['fused'])} | "
        f"{ms['all_to_all'][1] / ms['fused'][1]:.2f}x | "
        f"{ms['all_to_all_cf1.25'][1] / ms['fused'][1]:.2f}x |")
  lines.append("")
  lines.append("Cells are forward / forward+backward ms; speed-ups are forward+backward.")
  return "\n".join(lines)


def section(results_dir: pathlib.Path) -> str:
  """The README's benchmark section (between the markers)."""
  parts = [
      "_Generated by `python -m bench.report` from `bench/results/latest-*.json`; "
      "`make bench` (`python -m bench.run`) measures anew._",
      "",
  ]
  latest = records.load_latest(results_dir)
  if not latest:
    parts += ["No results yet.", ""]
  for plat, recs in latest.items():
    parts.append(measured_section(plat, recs))
  parts.append(gpu_section(results_dir))
  parts.append(modeled_section(results_dir))
  return "\n".join(parts)


def rewrite_readme(text: str, body: str, *, start: str = START, end: str = END,
                   heading: str = "Benchmarks") -> str:
  """`text` with everything between the markers replaced by `body`; the markers (under a
  "## {heading}" heading) are appended when absent."""
  if start not in text or end not in text:
    text = text.rstrip("\n") + f"\n\n## {heading}\n\n{start}\n{end}\n"
  head, rest = text.split(start, 1)
  _, tail = rest.split(end, 1)
  return f"{head}{start}\n{body.strip()}\n{end}{tail}"


def write_section(body: str, *, start: str = START, end: str = END,
                  heading: str = "Benchmarks", readme: pathlib.Path = README) -> None:
  """Rewrites `readme`'s section between the markers with `body` (see `rewrite_readme`)."""
  readme.write_text(rewrite_readme(readme.read_text(), body, start=start, end=end,
                                   heading=heading))


def regenerate(results_dir: pathlib.Path = records.RESULTS_DIR,
               readme: pathlib.Path = README) -> None:
  """Plots for every platform with results, and the README section."""
  for plat, recs in records.load_latest(results_dir).items():
    plot(plat, recs, results_dir)
  found = records.newest_gpu_results(results_dir)
  if found is not None:
    plot_gpu(found[1], results_dir)
  write_section(section(results_dir), readme=readme)


if __name__ == "__main__":
  argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help only
  regenerate()
