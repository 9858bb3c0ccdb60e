"""Facts about the host the benchmarks report next to their timings: nominal CPU peak and memory."""

from __future__ import annotations

import os


def cpu_peak_flops() -> float:
  """Nominal fp32 peak of this machine's CPUs: cores x clock x 32 FLOP/cycle.

  32 FLOP/cycle is two 256-bit FMA pipes (AVX2, or AVX-512 executed on 256-bit units as on AMD
  Zen 4). Override with HORSE_JAX_PEAK_GFLOPS for other machines.
  """
  env = os.environ.get("HORSE_JAX_PEAK_GFLOPS")
  if env:
    return float(env) * 1e9
  mhz = 0.0
  try:
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
      for line in f:
        if line.startswith("cpu MHz"):
          mhz = max(mhz, float(line.split(":")[1]))
  except OSError:
    pass
  return (os.cpu_count() or 1) * (mhz or 2500.0) * 1e6 * 32


def _proc_status_mb(field: str) -> float:
  """A kB field of /proc/self/status in MiB (0 where unavailable)."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return 0.0


def rss_mb() -> float:
  """Resident set size of this process (MiB)."""
  return _proc_status_mb("VmRSS")


def peak_rss_mb() -> float:
  """Peak resident set size of this process (MiB)."""
  return _proc_status_mb("VmHWM")
