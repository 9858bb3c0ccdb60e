"""Importing horse_jax sets no environment variable (a library must not change its user's process;
the `horse-jax` command sets what it needs in `cli.main.main`)."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]

CODE = """
import importlib, json, os, pkgutil
import flax, jax, jax.numpy, numpy, optax  # these set their own variables (TF_CPP_MIN_LOG_LEVEL...)
before = dict(os.environ)
import horse_jax
names = [m.name for m in pkgutil.walk_packages(horse_jax.__path__, "horse_jax.")
         if not m.name.endswith("__main__")]
for name in names:
  importlib.import_module(name)
after = dict(os.environ)
print(json.dumps({"n": len(names), "changed": sorted(k for k in set(before) | set(after)
                                                     if before.get(k) != after.get(k))}))
"""


def test_importing_horse_jax_sets_no_environment_variable():
  """Every module of horse_jax imported in a fresh process leaves os.environ as JAX left it."""
  env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}  # set by conftest
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env,
                       cwd=ROOT, check=True).stdout
  result = json.loads(out.strip().splitlines()[-1])
  assert result["n"] > 20 and result["changed"] == [], result
