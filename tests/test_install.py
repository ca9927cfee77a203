"""The installed package: what its native modules need from the environment they load in."""

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest

from jax_ccfuser import _extension


def _python(args: list, *, cwd: pathlib.Path, env=None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                        cwd=cwd, env={**os.environ, **(env or {})})


def test_modules_say_which_jaxlib_they_were_built_against():
  import jaxlib.version
  assert _extension.cpu.jaxlib_version() == jaxlib.version.__version__
  if _extension.cuda is not None:
    assert _extension.cuda.jaxlib_version() == jaxlib.version.__version__


def test_a_module_built_against_a_newer_jaxlib_is_refused_before_it_breaks_jax(tmp_path):
  """pip's isolated build compiles against the newest jax: in an environment with an older
  jaxlib, that jaxlib refused the handlers when its backend started, so `import jax_ccfuser`
  passed and every computation failed after it, jnp.ones(3) too. Run with the running jaxlib
  made to look older than the build's."""
  script = ("import jax, jaxlib.version\n"  # jax checks jaxlib's version once, at import
            "jaxlib.version.__version__ = '0.0.1'\n"
            "try:\n"
            "  import jax_ccfuser\n"
            "except ImportError as e:\n"
            "  print('refused:', e)\n"
            "import jax.numpy as jnp\n"
            "print('jax works:', float(jnp.ones(3).sum()))\n")
  out = _python(["-c", script], cwd=tmp_path)
  assert (f"refused: jax_ccfuser's native extension _ccfuser_cpu was built against jaxlib "
          f"{_extension.cpu.jaxlib_version()}'s FFI headers, but jaxlib 0.0.1 runs here"
          in out.stdout), out.stdout + out.stderr[-2000:]
  assert "jax works: 3.0" in out.stdout, out.stderr[-2000:]
  release = _extension._release
  assert release("0.12.0.1") < release("0.12.1") and release("0.12.1+cuda12") < release("0.12.2")
  # A dev or rc build ranks with its release, not after it (a module built against one loads
  # under the release).
  assert not release("0.11.0") < release("0.11.0.dev20251201")
  assert not release("0.5.0") < release("0.5.0rc1")


def test_the_installed_module_names_no_build_machine_path():
  """Its run path held the build's own OpenBLAS directory (an isolated build's, deleted since,
  or the build venv's, which a `pip install --target` then loaded silently)."""
  readelf = shutil.which("readelf")
  if readelf is None:
    pytest.skip("needs readelf (binutils)")
  dynamic = subprocess.run([readelf, "-d", _extension.cpu.__file__], capture_output=True,
                           text=True, check=True).stdout
  paths = [line.split("[", 1)[1].rstrip("]") for line in dynamic.splitlines()
           if "RUNPATH" in line or "RPATH" in line]
  assert paths and all(p.startswith("$ORIGIN") for path in paths for p in path.split(":")), paths


def test_the_package_loads_where_openblas_is_installed_elsewhere(tmp_path):
  """`pip install --target DIR` (or `--user` with the dependencies elsewhere) puts jax_ccfuser
  where its module's run path does not find scipy-openblas32's library: the import failed with
  "libscipy_openblas.so: cannot open shared object file". The package, module included, copied
  to a directory of its own and imported from there, site-packages after it."""
  package = tmp_path / "jax_ccfuser"
  shutil.copytree(pathlib.Path(_extension.__file__).parent, package,
                  ignore=shutil.ignore_patterns("__pycache__"))
  for module in (_extension.cpu, _extension.cuda):  # beside the sources, or not, if editable
    if module is not None and not (package / pathlib.Path(module.__file__).name).exists():
      shutil.copy(module.__file__, package)
  script = ("import jax_ccfuser, jax.numpy as jnp\n"
            "print(jax_ccfuser.__file__)\n"
            "x = jnp.arange(6.0).reshape(3, 2)\n"
            "ids, weights = jnp.array([[0], [1], [0]], jnp.int32), jnp.ones((3, 1))\n"
            "w_in, w_out = jnp.ones((2, 2, 4)) / 2, jnp.ones((2, 2, 2))\n"
            "args = (x, ids, weights, w_in, w_out)\n"
            "print(bool(jnp.allclose(jax_ccfuser.fused_moe(*args), "
            "jax_ccfuser.reference_moe(*args))))\n")
  # -S: no site hooks, so no editable install's finder points back at the repository.
  out = _python(["-S", "-c", script], cwd=tmp_path,
                env={"PYTHONPATH": f"{tmp_path}:{sysconfig.get_paths()['purelib']}"})
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.splitlines() == [str(tmp_path / "jax_ccfuser" / "__init__.py"), "True"]
