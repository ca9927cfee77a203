"""An analytic model of one MoE layer on D GPUs of a node: all_to_all baselines vs the fused op.

Per layer (per device; the slowest device sets the pace, so every term is taken on the busiest
one). With `R` the GEMM rate, `B` the achieved peer bandwidth per direction, `M` the HBM
bandwidth, `row = H * bytes`, `flop = 2 * H * 3F` per routed row (gated FFN):

- Routing skew `s` (the benchmark's definition): a share `s` of every device's tokens sends one
  of its K rows to one hot expert, the rest spread evenly. The hot expert's device then computes
  `rows_hot = T*K + s*T*(D-1)` rows instead of `T*K`.
- all_to_all + grouped GEMM, dropless (exact-size exchanges, as DeepEP does; the strongest
  dropless baseline): dispatch and combine are collectives, each
  `L_coll + rows * (D-1)/D * row / B`; the grouped GEMM `rows * flop / R`; the permute before
  and unpermute after are memory passes, `2 * 2 * rows * row / M`. Nothing overlaps.
  Backward: two more exchanges (dy out, dx back), twice the GEMM, the permutes again.
- all_to_all with capacity factor c: every buffer is padded to `c*T*K` rows, whatever the
  routing: fixed cost, and under skew it drops rows instead of slowing down.
- fused, as the CUDA path is built (cuda/api.cuh): a start barrier; the dispatch, which reads
  each (source token, device) row once however many of the token's K experts the device has
  (`rows_in`: the token-device pairs landing on the busiest device, the remote share over the
  link), source by source while the grouped GEMMs (at a stated share `fused_efficiency` of the
  GEMM rate) compute the rows already here: a two-stage pipeline over D sources, the own rows
  first. While later sources' rows are still coming the GEMMs run on `sms - fetch_sms` SMs
  (`jax_ccfuser.fetch_sms`), assumed enough for the fetch to read at the link's rate, and the
  last source's on all of them: `max(GEMM (D-1)/D * sms / (sms - fetch_sms), fetch) + GEMM / D`.
  With no SMs kept the fetch's blocks wait for the GEMMs' persistent grids, which hold every
  SM: `GEMM + fetch`, nothing overlapped. Phases run only where an expert gets `phase_rows` or
  more rows from each source on average (`T*K/E`), as the CUDA handler decides (each phase reads
  every expert's weights again; the model does not count those reads); otherwise the GEMMs wait
  for every source's rows: `GEMM + fetch`. Then the scatter, one float32 row per (token,
  device) out over the link, not overlapped; an end barrier; the sum of each token's
  `min(K, D)` float32 slots from HBM. Backward: the same pipeline fetches x and dy under the
  products that need them (h recomputed, u = dy w_out^T: one forward's worth), then dW_out,
  dW_in and dx (5/3 of a forward) and the float32 dx scatter: 8 H x F products per row where
  the forward runs 3 (forward+backward: 11/3 of the forward FLOPs against the baseline's 3).

Not modelled: kernel launch gaps, the router, the activation function's memory traffic (both
sides alike), and NVLink contention between the D devices (a switched node gives each its
full per-direction bandwidth).
"""

import dataclasses
import pathlib
import statistics

from bench import records

# The backward's H x F products per routed row, against the forward's 3: h recomputed (gate and
# up), u = dy w_out^T, dW_out, dW_in (two) and dx (two).
_BACKWARD_PRODUCTS = 8


@dataclasses.dataclass(frozen=True)
class Node:
  """One node of D GPUs; rates are achieved ones, not datasheet peaks."""
  name: str
  devices: int
  gemm_tflops: float        # R: grouped-GEMM rate per GPU (bf16)
  hbm_gbps: float           # M: HBM bandwidth per GPU
  link_gbps: float          # B: peer bandwidth achieved per GPU per direction
  link_latency_us: float    # one peer flag or small load: a barrier step
  collective_latency_us: float  # fixed cost of one all_to_all (launch and synchronisation)
  fused_efficiency: float = 1.0  # fused kernel's GEMM rate / R (gathered A-operand loads)
  sms: int = 132            # SMs per GPU (H100 and H200 SXM)
  fetch_sms: int = 16       # of them kept for the fetch (jax_ccfuser.fetch_sms's default: 1/8)
  phase_rows: int = 512     # T*K/E from which the GEMMs run in source phases (kPhaseRows)
  basis: str = "nominal"    # where the rates come from, for the README

  def __post_init__(self):
    if self.devices < 1 or min(self.gemm_tflops, self.hbm_gbps, self.link_gbps,
                               self.fused_efficiency) <= 0:
      raise ValueError(f"node needs positive devices and rates: {self}")
    if min(self.link_latency_us, self.collective_latency_us) < 0:
      raise ValueError(f"latencies cannot be negative: {self}")
    if not 0 <= self.fetch_sms < self.sms:
      raise ValueError(f"fetch_sms must leave the GEMMs an SM: {self}")


@dataclasses.dataclass(frozen=True)
class Layer:
  """One MoE layer's sizes, per device."""
  name: str
  tokens: int      # T per device
  hidden: int      # H
  ffn: int         # F
  experts: int     # E
  k: int           # K
  bytes_per_element: int = 2
  skew: float = 0.0


# Nominal: ~800 TFLOP/s bf16 measured on an 8192^3 product, ~3 TB/s HBM, NVLink 4
# at ~450 GB/s per direction of which DeepEP's intranode dispatch achieves ~150-160 GB/s.
# Latencies are assumptions: ~1 us for a peer flag over NVLink, ~20 us for an all_to_all's
# launch and synchronisation.
H100 = Node(name="8xH100 SXM (NVLink 4)", devices=8, gemm_tflops=800.0, hbm_gbps=3000.0,
            link_gbps=155.0, link_latency_us=1.0, collective_latency_us=20.0,
            basis="nominal")
# H200 SXM: the H100's chip (the same GEMM rate and links) with 4.8 TB/s of HBM3e by its
# datasheet, scaled like the H100's (3000/3350).
H200 = Node(name="8xH200 SXM (NVLink 4)", devices=8, gemm_tflops=800.0,
            hbm_gbps=4800.0 * 3000 / 3350, link_gbps=155.0, link_latency_us=1.0,
            collective_latency_us=20.0,
            basis="nominal: the H100's rates with the H200 datasheet's HBM")
# A100 SXM4 datasheet: 312 TFLOP/s bf16 dense, 2.0 TB/s HBM2e, NVLink 3 at 300 GB/s per
# direction; scaled by the H100's achieved/nominal ratios (800/989 for GEMMs, 155/450 for the
# links), the same latencies.
A100 = Node(name="8xA100 SXM (NVLink 3)", devices=8, gemm_tflops=312.0 * 800 / 989,
            hbm_gbps=2000.0, link_gbps=300.0 * 155 / 450, link_latency_us=1.0,
            collective_latency_us=20.0, sms=108, fetch_sms=108 // 8,
            basis="nominal: A100 datasheet scaled by the H100's achieved/nominal ratios")

# Layer shapes of public MoE models (hidden, expert FFN, experts, top-k).
SHAPES = (
    Layer("Mixtral-8x7B", tokens=4096, hidden=4096, ffn=14336, experts=8, k=2),
    Layer("DeepSeek-V3", tokens=4096, hidden=7168, ffn=2048, experts=256, k=8),
    Layer("Qwen3-30B-A3B", tokens=4096, hidden=2048, ffn=768, experts=128, k=8),
)


def _rows_hot(node: Node, layer: Layer) -> float:
  return layer.tokens * layer.k + layer.skew * layer.tokens * (node.devices - 1)


def _gemm_s(node: Node, rows: float, layer: Layer, efficiency: float = 1.0) -> float:
  return rows * 2.0 * layer.hidden * 3 * layer.ffn / (node.gemm_tflops * 1e12 * efficiency)


def _link_s(node: Node, rows: float, layer: Layer) -> float:
  """Seconds to move the remote share of `rows` rows one way over the busiest device's link."""
  remote = rows * (node.devices - 1) / node.devices
  return remote * layer.hidden * layer.bytes_per_element / (node.link_gbps * 1e9)


def all_to_all_ms(node: Node, layer: Layer, *, capacity_factor: float | None = None,
                  backward: bool = False) -> float:
  """Modelled layer time of all_to_all + grouped GEMM + all_to_all, in milliseconds.

  `capacity_factor=None` is dropless with exact-size exchanges; a float pads every buffer to
  `capacity_factor * T * K` rows (and drops what exceeds it).
  """
  if capacity_factor is None:
    rows = _rows_hot(node, layer)
  else:
    rows = min(capacity_factor, layer.experts) * layer.tokens * layer.k
  exchange = node.collective_latency_us * 1e-6 + _link_s(node, rows, layer)
  permute = 2 * 2 * rows * layer.hidden * layer.bytes_per_element / (node.hbm_gbps * 1e9)
  seconds = 2 * exchange + _gemm_s(node, rows, layer) + permute
  if backward:
    seconds += 2 * exchange + 2 * _gemm_s(node, rows, layer) + permute
  return 1e3 * seconds


def _distinct_share(layer: Layer, devices: int) -> float:
  """Chance that a uniformly routed token has at least one of its K (distinct) experts on a
  given device of `devices` with E / D experts each."""
  others = layer.experts - layer.experts // devices
  none_here = 1.0
  for j in range(layer.k):
    none_here *= max(others - j, 0) / (layer.experts - j)
  return 1.0 - none_here


def _rows_in(node: Node, layer: Layer) -> float:
  """(source token, device) rows landing on the busiest device: the skewed tokens each once (the
  hot expert is their first choice), the rest by `_distinct_share`."""
  tokens = node.devices * layer.tokens
  share = _distinct_share(layer, node.devices)
  return tokens * (layer.skew + (1 - layer.skew) * share)


def _pipelined_s(node: Node, layer: Layer, gemm: float, fetched: float) -> float:
  """The source phases: `gemm` seconds of GEMMs on all SMs, `fetched` seconds of peers' rows."""
  if node.fetch_sms == 0 or layer.tokens * layer.k < node.phase_rows * layer.experts:
    return gemm + fetched
  last = gemm / node.devices
  beside_fetch = (gemm - last) * node.sms / (node.sms - node.fetch_sms)
  return max(beside_fetch, fetched) + last


def fused_ms(node: Node, layer: Layer, *, backward: bool = False) -> float:
  """Modelled layer time of the fused op as built (see the module docstring), in ms."""
  rows = _rows_hot(node, layer)
  gemm = _gemm_s(node, rows, layer, node.fused_efficiency)
  fetch = _link_s(node, _rows_in(node, layer), layer)
  # The scatter sends float32 rows: 4 bytes an element against the layer's.
  scatter = fetch * 4 / layer.bytes_per_element
  barriers = 2 * node.link_latency_us * 1e-6
  partial_sums = (layer.tokens * min(layer.k, node.devices) * layer.hidden * 4
                  / (node.hbm_gbps * 1e9))
  seconds = _pipelined_s(node, layer, gemm, fetch) + scatter + barriers + partial_sums
  if backward:
    seconds += (_pipelined_s(node, layer, gemm, 2 * fetch) + gemm * (_BACKWARD_PRODUCTS - 3) / 3
                + scatter + barriers + partial_sums)
  return 1e3 * seconds


# GPUs whose SMs are the same chip's: the fused kernels' share of the roof carries between them.
_SAME_SMS = (("H100", "H200"), ("A100",))


def _efficiency(doc: dict) -> float | None:
  """The fused GEMMs' share of the dense roof in a results file: per shape, fused's forward rate
  (with no SMs kept for the fetch, `fused_fetch_sms0`, where the file has it: the model splits
  the SMs itself) over the roof's; the median over the shapes."""
  ratios = []
  for config in doc["benchmark"]["configs"].values():
    rate = lambda impl: config["impls"].get(impl, {}).get("fwd_tflops")
    fused = rate("fused_fetch_sms0") or rate("fused")
    if fused and rate("roof"):
      ratios.append(fused / rate("roof"))
  return min(statistics.median(ratios), 1.0) if ratios else None


def calibrate(node: Node, results_dir: pathlib.Path) -> Node:
  """`node` with what the newest GPU results file (bench/gpu_check.py's) in `results_dir` says.

  From a file of the node's own GPU (e.g. "H200"): the dense roof's median forward rate over
  the benchmark's shapes becomes the GEMM rate, and the fused GEMMs' share of it
  (`_efficiency`) the fused efficiency. From a file of another GPU with the same SMs (H100 and
  H200) only the efficiency, a property of the kernels on those SMs; the node keeps its stated
  rates. Link bandwidth and latencies stay as stated (one GPU measures no link). Without such a
  file the node keeps its stated rates and fused runs at the roof's rate, its best case, as the
  baselines' GEMMs always do; its `basis` says which of the three it is.
  """
  gpu = node.name.split("x", 1)[1].split()[0]  # "8xH100 SXM ..." -> "H100"
  own = records.newest_gpu_results(results_dir, device=gpu)
  efficiency = own and _efficiency(own[1])
  if efficiency is not None:
    path, doc = own
    roofs = [c["impls"]["roof"]["fwd_tflops"] for c in doc["benchmark"]["configs"].values()
             if c["impls"].get("roof", {}).get("fwd_tflops")]
    return dataclasses.replace(node, gemm_tflops=statistics.median(roofs),
                               fused_efficiency=efficiency, basis=f"calibrated on {path.name}")
  family = next((names for names in _SAME_SMS if gpu in names), ())
  kin = []  # (date, path, efficiency) of the newest file of each other GPU of the same SMs
  for other in family:
    found = records.newest_gpu_results(results_dir, device=other) if other != gpu else None
    if found and (share := _efficiency(found[1])) is not None:
      kin.append((found[1].get("date", ""), found[0], share))
  if not kin:
    return dataclasses.replace(node, basis=f"{node.basis} (no GPU results file to calibrate on)")
  _, path, efficiency = max(kin, key=lambda item: item[:2])
  return dataclasses.replace(
      node, fused_efficiency=efficiency,
      basis=f"{node.basis}; fused GEMM efficiency from {path.name} (the same SMs)")


def table(nodes, shapes=SHAPES, skews=(0.0, 0.5)) -> list[dict]:
  """Model rows for every node, shape and skew: `{impl: (forward ms, forward+backward ms)}`."""
  impls = {
      "all_to_all": lambda node, layer, backward: all_to_all_ms(node, layer, backward=backward),
      "all_to_all_cf1.25": lambda node, layer, backward: all_to_all_ms(
          node, layer, capacity_factor=1.25, backward=backward),
      "fused": fused_ms,
  }
  rows = []
  for node in nodes:
    for shape in shapes:
      for skew in skews:
        layer = dataclasses.replace(shape, skew=skew)
        rows.append(dict(node=node.name, basis=node.basis, layer=layer, ms={
            name: (fn(node, layer, backward=False), fn(node, layer, backward=True))
            for name, fn in impls.items()}))
  return rows
