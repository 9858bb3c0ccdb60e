"""`horse-jax bench` runs the checkout's `benchmarks/` package; the library holds no benchmark."""

import os

import pytest

import horse_jax
from horse_jax.cli import bench as cli_bench
from horse_jax.cli.main import main
from horse_jax.errors import UserError

PACKAGE = os.path.dirname(os.path.abspath(horse_jax.__file__))
CHECKOUT = os.path.dirname(PACKAGE)


def test_the_suite_is_imported_from_the_checkout():
  suite = cli_bench.load_suite()
  assert os.path.dirname(suite.__file__) == os.path.join(CHECKOUT, "benchmarks")
  assert {"forward", "horse_meta_step", "horen_llama8"} <= set(suite.BENCHMARKS)
  assert set(suite.ON_REQUEST) <= set(suite.BENCHMARKS)


def test_outside_a_checkout_bench_refuses_in_one_line(tmp_path, monkeypatch):
  monkeypatch.setattr(cli_bench, "_checkout_root", lambda: str(tmp_path))
  with pytest.raises(UserError, match="source checkout") as err:
    cli_bench.load_suite()
  assert "\n" not in str(err.value)


def test_an_unknown_benchmark_is_named_before_any_work(capsys):
  assert main(["bench", "--only", "no_such_bench"]) != 0
  err = capsys.readouterr().err
  assert "no_such_bench" in err and "horse_meta_step" in err


def test_the_library_holds_no_benchmark_module():
  found = []
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      path = os.path.relpath(os.path.join(folder, name), PACKAGE)
      if name.endswith(".py") and "bench" in name and path != os.path.join("cli", "bench.py"):
        found.append(path)
  assert found == []


def test_importing_the_benchmarks_sets_no_environment_variable():
  """Every write to os.environ after jax is imported is recorded (a write of an inherited value
  included), in a fresh process so no earlier import hides one."""
  import subprocess
  import sys
  code = ("import os, jax\n"
          "writes = []\n"
          "environ = type(os.environ)\n"
          "set_item = environ.__setitem__\n"
          "environ.__setitem__ = lambda self, k, v: (writes.append(k), set_item(self, k, v))[1]\n"
          "import benchmarks.suite, benchmarks.hypernet, benchmarks.codebook\n"
          "print(writes)\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=CHECKOUT, capture_output=True, text=True,
                       check=True, env=dict(os.environ, PYTHONPATH=CHECKOUT))
  assert out.stdout.strip() == "[]"
