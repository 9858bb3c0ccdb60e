"""Benchmarks of horse-jax's hot paths: timing tools of a source checkout, not part of the library.

They are not installed with the package; run them from a clone (with `pip install -e .`):

  horse-jax bench [--only NAME] [--reference]     the suite (`benchmarks.suite`), markdown + JSON
  python -m benchmarks.hypernet [--unrolled-flops]  the compiled HORSE programs on the world model
  python -m benchmarks.codebook --edits 10000       HoReN/GRACE sequential editing on a tiny Llama

Modules: `suite` (the `horse-jax bench` entries), `hypernet`, `codebook`, `machine` (CPU peak and
memory of the host, reported next to the timings).
"""
