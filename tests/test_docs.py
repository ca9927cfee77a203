"""The examples users copy: every docstring example runs and prints what it shows, and so do
the README's Python blocks.

Docstring examples are doctests with `jax`, `jnp`, `np` and `jax_ccfuser` in scope (as in JAX's
own docstrings) and nothing else, not their module's names: each imports what else it uses, as
a reader who pastes it must. They run on the 8 simulated devices of conftest.py. A README
block runs unless the line before its fence is `<!-- fragment: why -->` (a part of a larger
script); the others run in order as one script in a fresh process, as a reader pastes them one
after another.
"""

import doctest
import importlib
import json
import os
import pathlib
import pkgutil
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ccfuser
import models

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _modules_with_examples():
  names = []
  for package in (jax_ccfuser, models):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
      names.append(info.name)
  names += [jax_ccfuser.__name__, models.__name__]
  finder = doctest.DocTestFinder(exclude_empty=True)
  return sorted(name for name in names
                if any(t.examples for t in finder.find(importlib.import_module(name))))


def test_every_public_module_with_examples_is_collected():
  names = _modules_with_examples()
  for public in ("jax_ccfuser._fused", "jax_ccfuser._router", "jax_ccfuser._reassign",
                 "jax_ccfuser.nnx", "jax_ccfuser.linen", "jax_ccfuser.placement"):
    assert public in names


@pytest.mark.parametrize("name", _modules_with_examples())
def test_docstring_examples_run_as_shown(name):
  module = importlib.import_module(name)
  scope = {"jax": jax, "jnp": jnp, "np": np, "jax_ccfuser": jax_ccfuser}
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  for test in doctest.DocTestFinder(exclude_empty=True).find(module, name, globs=scope):
    runner.run(test)
  results = runner.summarize(verbose=False)
  assert results.attempted > 0
  assert results.failed == 0, f"{results.failed} of {name}'s examples failed (printed above)"


def _readme_blocks():
  """`(runnable, fragments)`: the code of each ```python block, split by the line before it."""
  runnable, fragments = [], []
  lines = README.read_text().splitlines()
  for start, line in enumerate(lines):
    if line != "```python":
      continue
    end = lines.index("```", start + 1)
    code = "\n".join(lines[start + 1:end]) + "\n"
    before = lines[start - 1]
    if before.startswith("<!-- fragment"):
      assert re.fullmatch(r"<!-- fragment: \S.* -->", before), f"say why: {before!r}"
      fragments.append(code)
    else:
      runnable.append(code)
  return runnable, fragments


@pytest.mark.slow
def test_readme_python_blocks_run_in_order():
  """In a fresh process, as a reader pastes them into one script: the blocks set up their own
  devices (this suite's eight are not theirs)."""
  runnable, fragments = _readme_blocks()
  assert len(runnable) >= 3 and fragments, (len(runnable), len(fragments))
  script = "".join(runnable) + (
      "import json\n"
      "print(json.dumps({'y': list(y.shape), 'y_finite': bool(jnp.all(jnp.isfinite(y))),\n"
      "                  'loss': list(loss.shape), 'loss_finite': bool(jnp.isfinite(loss))}))\n")
  env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "NPROC")}
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=600, env=env, cwd=README.parent)
  assert done.returncode == 0, done.stderr[-3000:]
  shown = json.loads(done.stdout.splitlines()[-1])
  assert shown == {"y": [64, 32], "y_finite": True, "loss": [], "loss_finite": True}, shown
