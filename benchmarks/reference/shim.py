"""Run the HoReN reference code (github ha11ucin8/HoReN) on CPU, from a user's checkout, untouched.

Nothing of the reference is copied or edited: `load(code_dir)` imports its `src/` package under
another name at run time, and `cpu()` is a context in which torch sends everything the reference
puts on a CUDA device (`.cuda()`, `.to("cuda:0")`, `device="cuda:0"` of factory functions) to the
CPU instead.

Two things make that possible without the reference's heavy dependencies:
  - the packages whose `__init__.py` imports every editor, data set and trainer of the repository
    (`src`, `src.models`, `src.trainer`, `src.trainer.algs`, `src.util`) are registered as empty
    packages pointing at their folders, so importing `src.models.rome` runs only what ROME needs;
  - the repository is imported as `horen_reference` (not `src`), so it cannot clash with another
    `src` package of the user's environment; its own imports are relative.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
import types

PACKAGE = "horen_reference"
# Packages imported without running their __init__.py (each imports the whole repository).
_HOLLOW = ("", "models", "trainer", "trainer.algs", "util")


def check_checkout(code_dir: str) -> str:
  """The `src` folder of a checkout of the reference repository.

  Raises:
    FileNotFoundError: `code_dir` is not such a checkout (one line, naming what is missing).
  """
  src = os.path.join(os.path.abspath(code_dir), "src")
  for rel in ("models", "util"):
    if not os.path.isdir(os.path.join(src, rel)):
      raise FileNotFoundError(f"{code_dir} is not a checkout of the HoReN reference repository "
                              f"(no src/{rel} folder)")
  return src


def load(code_dir: str, module: str) -> types.ModuleType:
  """Imports `src.<module>` of the reference checkout at `code_dir` (e.g. "models.rome.rome_main").

  Args:
    code_dir: the checkout's root (the folder holding `src/` and `hparams/`).
    module: dotted module path below `src`.

  Returns:
    The imported module.
  """
  src = check_checkout(code_dir)
  loaded = sys.modules.get(PACKAGE)
  if loaded is not None and list(loaded.__path__) != [src]:
    raise RuntimeError(f"the reference code of {loaded.__path__[0]} is already imported in this "
                       f"process; {src} needs a new process")
  for rel in _HOLLOW:
    name = PACKAGE + ("." + rel if rel else "")
    if name not in sys.modules:
      pkg = types.ModuleType(name)
      pkg.__path__ = [os.path.join(src, *rel.split("."))] if rel else [src]
      pkg.__package__ = name
      sys.modules[name] = pkg
  return importlib.import_module(f"{PACKAGE}.{module}")


def _to_cpu(device):
  """A device argument with CUDA replaced by the CPU (anything else unchanged)."""
  import torch  # noqa: PLC0415
  if isinstance(device, int) and not isinstance(device, bool):
    return torch.device("cpu")
  if isinstance(device, str) and device.startswith("cuda"):
    return torch.device("cpu")
  if isinstance(device, torch.device) and device.type == "cuda":
    return torch.device("cpu")
  return device


def _args_to_cpu(args, kwargs, positional: bool):
  import torch  # noqa: PLC0415
  if "device" in kwargs:
    kwargs = dict(kwargs, device=_to_cpu(kwargs["device"]))
  # .to("cuda:0"), .to(torch.device("cuda")), .to(0): the first positional argument is a device
  # (a dtype or a tensor is left alone); a factory's positional arguments are sizes and data
  if (positional and args and isinstance(args[0], (str, int, torch.device))
      and not isinstance(args[0], bool)):
    args = (_to_cpu(args[0]),) + tuple(args[1:])
  return args, kwargs


# Factory functions the reference calls with `device=`.
_FACTORIES = ("tensor", "zeros", "ones", "empty", "eye", "full", "arange", "rand", "randn",
              "randint", "zeros_like", "ones_like", "full_like", "empty_like", "as_tensor",
              "linspace")


@contextlib.contextmanager
def cpu():
  """A context in which torch maps every CUDA device the reference names to the CPU.

  Patched while it lasts (and restored after): `Tensor.to`, `Tensor.cuda`, `Module.to`,
  `Module.cuda` and the factory functions of `_FACTORIES`; `torch.cuda.empty_cache` and
  `torch.cuda.synchronize` become no-ops. The wrappers only rewrite arguments, so the cost they
  add to the reference is one Python call per patched call (none per tensor operation).
  """
  import torch  # noqa: PLC0415
  saved = []

  def patch(owner, name, make):
    original = getattr(owner, name)
    saved.append((owner, name, original))
    setattr(owner, name, make(original))

  def rewrite(original):
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
      args, kwargs = _args_to_cpu(args, kwargs, positional=False)
      return original(*args, **kwargs)
    return wrapper

  def method_rewrite(original):
    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
      args, kwargs = _args_to_cpu(args, kwargs, positional=True)
      return original(self, *args, **kwargs)
    return wrapper

  def stay(original):
    del original
    return lambda self, *args, **kwargs: self

  try:
    patch(torch.Tensor, "to", method_rewrite)
    patch(torch.nn.Module, "to", method_rewrite)
    patch(torch.Tensor, "cuda", stay)
    patch(torch.nn.Module, "cuda", stay)
    for name in _FACTORIES:
      patch(torch, name, rewrite)
    patch(torch.cuda, "empty_cache", lambda original: lambda *a, **k: None)
    patch(torch.cuda, "synchronize", lambda original: lambda *a, **k: None)
    yield
  finally:
    for owner, name, original in reversed(saved):
      setattr(owner, name, original)
