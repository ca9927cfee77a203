"""Wall-clock timing and XLA's compiled memory analysis of one program."""

import dataclasses
import statistics
import time
from typing import Callable

import jax


@dataclasses.dataclass(frozen=True)
class Memory:
  """Per-device bytes from `Compiled.memory_analysis()` (one SPMD partition's program).

  `temp` is XLA's temp allocation: everything the program allocates beyond its arguments and
  results (intermediates, dispatch buffers, residuals kept for the backward pass), packed by
  liveness. Memory a custom call allocates on the host heap by itself is invisible here.
  """
  argument: int
  output: int
  temp: int
  alias: int

  @property
  def peak(self) -> int:
    """An upper bound on the bytes live at once: arguments + results + temp - aliased."""
    return self.argument + self.output + self.temp - self.alias


def compile_program(fn: Callable, args) -> tuple[Callable, Memory]:
  """`fn` (jitted) lowered and compiled for `args`, and its memory analysis."""
  compiled = fn.lower(*args).compile()
  stats = compiled.memory_analysis()
  return compiled, Memory(argument=stats.argument_size_in_bytes,
                          output=stats.output_size_in_bytes,
                          temp=stats.temp_size_in_bytes, alias=stats.alias_size_in_bytes)


@dataclasses.dataclass(frozen=True)
class Timing:
  """Medians of one program's samples."""
  ms: float      # wall clock
  cpu_ms: float  # CPU time of the whole process (all threads), spin-waits included
  samples: int


def interleaved_medians(runs: dict, *, min_samples: int, max_samples: int,
                        budget_s: float) -> dict:
  """Median wall time in milliseconds of each of `runs`, sampled round-robin.

  Args:
    runs: `{key: (compiled, inputs)}`; a sample is `compiled(*inputs(i))`, with fresh inputs
      built before the clock starts, so no result or cache line carries over from the previous
      call of that program.
    min_samples: samples kept per run, at least.
    max_samples: samples kept per run, at most; rounds go on while under `budget_s`.
    budget_s: seconds of timed calls (all runs together) after which no new round starts.

  Returns:
    `{key: Timing}`.

  Every run gets one sample per round, so a change in machine load (other processes sharing the
  cores) hits all of them alike and their ratios stay fair. The first round pays for first-touch
  page faults and thread-pool start-up: it is timed and dropped.
  """
  wall = {key: [] for key in runs}
  cpu = {key: [] for key in runs}
  spent = 0.0
  for round_ in range(1 + max_samples):
    if round_ > min_samples and spent > budget_s:
      break
    for key, (compiled, inputs) in runs.items():
      args = jax.block_until_ready(inputs(round_))
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(compiled(*args))
      wall[key].append(time.perf_counter() - start)
      cpu[key].append(time.process_time() - start_cpu)
      spent += wall[key][-1]
  return {key: Timing(ms=1e3 * statistics.median(wall[key][1:]),
                      cpu_ms=1e3 * statistics.median(cpu[key][1:]), samples=len(wall[key]) - 1)
          for key in runs}
