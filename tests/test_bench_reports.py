"""bench.traffic and bench.reassign produce honest records on a tiny configuration."""

import jax_ccfuser as ccf
from bench import reassign, traffic
from bench.problem import Config

TINY = Config(devices=4, tokens=16, hidden=16, ffn=16, experts=8, k=2, skew=0.9)


def test_traffic_record():
  r = traffic.measure(TINY)
  # The busiest device's forward and backward together, not the largest single record (one
  # direction), which is about 60% of what the device moves.
  records = ccf.peer_traffic()  # the fused program's, left by measure
  assert {rec["backward"] for rec in records} == {False, True}
  moved = lambda rec: rec["remote_bytes_read"] + rec["remote_bytes_written"]
  per_rank = [sum(moved(rec) for rec in records if rec["rank"] == rank) for rank in range(4)]
  assert r["bytes"]["fused"] == max(per_rank) > max(map(moved, records)) > 0
  assert r["bytes"]["fused"] < r["bytes"]["all_to_all"]
  assert r["activation_bytes"]["fused"] < r["activation_bytes"]["all_to_all_cf1.25"]
  assert "| 8 | 2 | 0.9 |" in traffic.section([r])


def test_reassign_record():
  r = reassign.measure(TINY)
  # 64 rows in tiles of 32: coarse, but the busiest device must shed rows.
  assert r["imbalance_before"] >= 2.0 > r["imbalance_after"]
  assert min(r["plan_ms"], r["layer_fwd_bwd_ms"], r["layer_with_plan_fwd_bwd_ms"]) > 0
  assert "| 0.9 |" in reassign.section([r])
