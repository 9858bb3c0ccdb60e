"""Hugging Face checkpoints in and out: config.json + safetensors (single file or sharded index).

Reading is lazy: tensors are opened with `safetensors.safe_open(framework="np")` (memory-mapped) and
read one at a time; with a mesh, `jax.make_array_from_callback` asks for each device's slice only, so
no host ever holds a whole sharded weight. Export writes HF names and layout back, so the result
loads in transformers (or any other runtime) unchanged, and load -> export -> load is bit-exact.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open

from horse_jax import distributed
from horse_jax.errors import UserError
from horse_jax.io import atomic_directory, stream_safetensors
from horse_jax.models import hf_map, mxfp4
from horse_jax.models.config import ModelConfig, config_from_hf, config_to_hf
from horse_jax.models.transformer import Model

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' default


def dtype_name(dtype: Any) -> str:
  """'float32' / 'bfloat16' / 'float16' for a JAX/NumPy dtype or such a string."""
  name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype.replace("torch.", "")
  if name not in _DTYPES:
    raise UserError(f"unsupported dtype {dtype!r} (supported: {', '.join(_DTYPES)})")
  return name


def read_config(path: str | os.PathLike) -> ModelConfig:
  """Parses `<path>/config.json` (either transformers config form)."""
  folder = Path(path)
  if not folder.is_dir():
    raise UserError(f"model folder {str(folder)!r} does not exist")
  config_file = folder / "config.json"
  if not config_file.is_file():
    raise UserError(f"{config_file}: config.json is missing")
  try:
    hf = json.loads(config_file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    raise UserError(f"{config_file}: not valid JSON ({err})") from None
  if not isinstance(hf, dict):
    raise UserError(f"{config_file}: expected a JSON object")
  return config_from_hf(hf, source=str(config_file))


class _Tensors:
  """Name -> lazily opened safetensors file, for a single file or a sharded index."""

  def __init__(self, folder: Path, stack: contextlib.ExitStack):
    self.folder, self._stack, self._handles = folder, stack, {}
    index = folder / INDEX_FILE
    single = folder / SINGLE_FILE
    if index.is_file():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{index}: not a safetensors index ({err!r})") from None
      self.where = {str(k): str(v) for k, v in weight_map.items()}
      self.index_name = INDEX_FILE
    elif single.is_file():
      self.where = {name: SINGLE_FILE for name in self._open(SINGLE_FILE).keys()}
      self.index_name = SINGLE_FILE
    else:
      raise UserError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE} found "
                      "(only safetensors checkpoints are supported)")

  def _open(self, filename: str):
    if filename not in self._handles:
      file = self.folder / filename
      if not file.is_file():
        raise UserError(f"{file}: shard file listed in {INDEX_FILE} is missing")
      try:
        self._handles[filename] = self._stack.enter_context(safe_open(str(file), framework="np"))
      except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{file}: cannot read safetensors file ({err})") from None
    return self._handles[filename]

  def resolve(self, name: str) -> str | None:
    """The stored name of a tensor; old GPT-2 checkpoints omit the `transformer.` prefix."""
    if name in self.where:
      return name
    short = name.removeprefix("transformer.")
    return short if short in self.where else None

  def slice(self, name: str):
    filename = self.where[name]
    handle = self._open(filename)
    if name not in handle.keys():
      raise UserError(f"{self.folder / filename}: tensor {name!r} is missing "
                      f"(listed in {self.index_name})")
    return handle.get_slice(name), self.folder / filename


def _read(slice_, entry: hf_map.Entry, index: tuple[slice, ...] | None, dtype) -> np.ndarray:
  """Reads (a block of) one tensor in our layout; `index` is in our layout too."""
  if index is None:
    index = (slice(None),) * len(entry.shape)
  if entry.kind == hf_map.LINEAR:
    array = slice_[tuple(reversed(index))].T
  else:
    array = slice_[index]
  return np.ascontiguousarray(array).astype(dtype, copy=False)


def _mxfp4_slice(tensors: _Tensors, entry: hf_map.Entry, dtype):
  """An MXFP4 `<name>_blocks` / `<name>_scales` pair (gpt-oss experts) read as one tensor."""
  blocks, file = tensors.slice(tensors.resolve(entry.hf_name + "_blocks"))
  scales_name = tensors.resolve(entry.hf_name + "_scales")
  if scales_name is None:
    raise UserError(f"{file}: tensor {entry.hf_name + '_blocks'!r} has no matching _scales")
  try:
    return mxfp4.PackedSlice(blocks, tensors.slice(scales_name)[0], dtype), file
  except ValueError as err:
    raise UserError(f"{file}: {entry.hf_name}: {err}") from None


def from_pretrained(path: str | os.PathLike, dtype: Any = jnp.float32, mesh=None,
                    fsdp: bool = False) -> Model:
  """Loads a Hugging Face checkpoint folder (config.json + safetensors).

  Args:
    path: folder with config.json and model.safetensors or model.safetensors.index.json + shards.
    dtype: param dtype (jnp.float32, jnp.bfloat16, jnp.float16 or their names).
    mesh: optional (data, model) mesh (`sharding.make_mesh`); params are then created sharded by
      the architecture's `sharding_rules` and each device reads only its own slice of each tensor.
    fsdp: with a mesh, also split matrices over `data` (`sharding.fsdp_spec`).

  Returns:
    The model.

  Raises:
    UserError: missing folder/config/weights, unsupported model_type, missing or misshaped tensor.
  """
  from horse_jax.models import sharding  # local: sharding imports transformer lazily too
  folder = Path(path)
  cfg = read_config(folder)
  np_dtype = _DTYPES[dtype_name(dtype)]
  params: dict = {}
  rules = sharding.rules_for(cfg)
  with contextlib.ExitStack() as stack:
    tensors = _Tensors(folder, stack)
    for entry in hf_map.entries(cfg):
      stored = tensors.resolve(entry.hf_name)
      packed = None if stored else tensors.resolve(entry.hf_name + "_blocks")
      if stored is None and packed is None:
        raise UserError(f"{folder / tensors.index_name}: tensor {entry.hf_name!r} is missing")
      slice_, file = tensors.slice(stored) if stored else _mxfp4_slice(tensors, entry, np_dtype)
      shape = tuple(slice_.get_shape())
      if shape != entry.hf_shape:
        raise UserError(f"{file}: tensor {stored or entry.hf_name!r} has shape {list(shape)}, "
                        f"expected {list(entry.hf_shape)} from config.json")
      if mesh is None:
        value = jnp.asarray(_read(slice_, entry, None, np_dtype))
      else:
        # Devices holding the same block (replicas over `data`) share one read.
        blocks: dict = {}

        def read_block(index, s=slice_, e=entry, blocks=blocks):
          key = tuple((i.start, i.stop, i.step) for i in index)
          if key not in blocks:
            blocks[key] = _read(s, e, index, np_dtype)
          return blocks[key]

        value = jax.make_array_from_callback(
            entry.shape, sharding.sharding_for(entry.path, entry.shape, mesh, fsdp, rules=rules),
            read_block)
      hf_map.set_path(params, entry.path, value)
  return Model(params, cfg)


def _updated_config_json(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
  hf = cfg.hf_config if cfg.hf_config else config_to_hf(cfg)
  hf.pop("quantization_config", None)  # tensors are written dequantized (e.g. MXFP4 experts)
  keys = [k for k in ("dtype", "torch_dtype") if k in hf] or ["dtype"]
  for key in keys:
    hf[key] = dtype
  return hf


def _declared_dtype(cfg: ModelConfig) -> str | None:
  hf = cfg.hf_config
  for key in ("dtype", "torch_dtype"):
    value = hf.get(key)
    if isinstance(value, str) and value.replace("torch.", "") in _DTYPES:
      return value.replace("torch.", "")
  return None


def _copy_tokenizer(tokenizer_src: Any, out: str) -> None:
  if tokenizer_src is None:
    return
  if hasattr(tokenizer_src, "save_pretrained"):  # a tokenizer object
    tokenizer_src.save_pretrained(out)
    return
  src = Path(tokenizer_src)
  if not src.is_dir():
    raise UserError(f"tokenizer folder {str(src)!r} does not exist")
  copied = 0
  for name in TOKENIZER_FILES:
    if (src / name).is_file():
      shutil.copyfile(src / name, Path(out) / name)
      copied += name != "generation_config.json"
  if not copied:
    raise UserError(f"{src}: no tokenizer files found (looked for {', '.join(TOKENIZER_FILES[:6])})")


def shard_size_bytes(max_shard_size: int | str) -> int:
  """transformers' `max_shard_size` in bytes: an int, or a string such as "5GB", "500MB", "2GiB".

  Raises:
    UserError: the text is not a size.
  """
  if isinstance(max_shard_size, (int, np.integer)) and not isinstance(max_shard_size, bool):
    size = int(max_shard_size)
  else:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B?)?\s*", str(max_shard_size).upper())
    if not match:
      raise UserError(f"max_shard_size {max_shard_size!r}: expected a size like 5GB, 500MB or 2GiB")
    unit = match[2] or "B"
    scale = {"B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}.get(unit)
    if scale is None:
      raise UserError(f"max_shard_size {max_shard_size!r}: unknown unit {unit!r}")
    size = int(float(match[1]) * scale)
  if size <= 0:
    raise UserError(f"max_shard_size {max_shard_size!r}: must be positive")
  return size


def _hf_tensor(model: Model, entry: hf_map.Entry, np_dtype: Any) -> np.ndarray:
  """One weight in HF layout and file dtype, gathered from wherever it lives (see `save_pretrained`).

  Every process of a multi-host run must call this for the same entries in the same order (a
  weight split over processes is gathered collectively). At most the gathered value and its
  converted copy are alive at once.
  """
  value = distributed.to_host(hf_map.get_path(model.params, entry.path))
  if tuple(value.shape) != entry.shape:
    raise UserError(f"param {entry.path!r} has shape {list(value.shape)}, expected {list(entry.shape)}")
  if entry.kind == hf_map.LINEAR:
    value = value.T
  # One copy at most: the transpose, the dtype cast and C order are done together.
  return np.asarray(value, dtype=np_dtype, order="C")


def save_pretrained(model: Model, path: str | os.PathLike | None, tokenizer_src: Any = None,
                    dtype: Any = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> None:
  """Writes a Hugging Face checkpoint folder atomically (the folder is replaced whole on success).

  Tensors are gathered and written one at a time (`horse_jax.io.stream_safetensors`): the host
  holds at most one weight as gathered plus its converted copy, never a whole file shard or the
  whole model, on a mesh or across processes alike. In a multi-host run every process must call
  this (each weight split over processes is gathered collectively, one weight at a time, with
  `jax.experimental.multihost_utils.process_allgather`) and process 0 alone writes.

  Args:
    model: the model (its params may be sharded over a mesh, on one or several processes).
    path: output folder, used by process 0 only (other processes may pass None).
    tokenizer_src: a folder to copy tokenizer files (and generation_config.json) from, or a
      tokenizer object with `save_pretrained`; None writes no tokenizer.
    dtype: tensor dtype in the file; default the dtype the original config.json declared (so an
      edit made in float32 on a bfloat16 checkpoint exports as bfloat16), else the model's dtype.
    max_shard_size: transformers' setting of that name: files of at most this many bytes (an int,
      or "5GB", "500MB", "2GiB"); above it the weights are split over several files
      model-0000i-of-0000n.safetensors plus model.safetensors.index.json, whole tensors per file
      in HF order (a tensor larger than the limit gets a file of its own).
  """
  cfg = model.config
  out_dtype = dtype_name(dtype) if dtype is not None else (_declared_dtype(cfg) or
                                                           dtype_name(model.dtype))
  np_dtype = _DTYPES[out_dtype]
  limit = shard_size_bytes(max_shard_size)
  entries = hf_map.entries(cfg)
  # Group tensors into shards of at most `limit` bytes (whole tensors; in HF order).
  shards: list[list[hf_map.Entry]] = [[]]
  size = 0
  for entry in entries:
    nbytes = int(np.prod(entry.shape)) * np.dtype(np_dtype).itemsize
    if shards[-1] and size + nbytes > limit:
      shards.append([])
      size = 0
    shards[-1].append(entry)
    size += nbytes
  names = [SINGLE_FILE] if len(shards) == 1 else [
      f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  with contextlib.ExitStack() as stack:
    # Only process 0 writes; the others take part in each weight's gather (tmp None).
    tmp = stack.enter_context(atomic_directory(path)) if distributed.is_main() else None
    weight_map, total = {}, 0
    for filename, group in zip(names, shards):
      specs = [(e.hf_name, np_dtype, e.hf_shape) for e in group]
      total += stream_safetensors(
          os.path.join(tmp, filename) if tmp else None, specs,
          lambda i, group=group: _hf_tensor(model, group[i], np_dtype), metadata={"format": "pt"})
      weight_map.update({e.hf_name: filename for e in group})
    if tmp is None:
      return
    if len(shards) > 1:
      with open(os.path.join(tmp, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(_updated_config_json(cfg, out_dtype), f, indent=2, sort_keys=True)
      f.write("\n")
    _copy_tokenizer(tokenizer_src, tmp)


def load_tokenizer(path: str | os.PathLike):
  """`transformers.AutoTokenizer` from a local folder, with a pad token (eos if none is set).

  Raises:
    UserError: the folder does not exist or holds no loadable tokenizer.
  """
  folder = Path(path)
  if not folder.is_dir():
    raise UserError(f"tokenizer folder {str(folder)!r} does not exist")
  from transformers import AutoTokenizer
  try:
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
  except (OSError, ValueError, TypeError) as err:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    raise UserError(f"{folder}: cannot load a tokenizer ({first})") from None
  if tokenizer.pad_token is None and tokenizer.eos_token is not None:
    tokenizer.pad_token = tokenizer.eos_token
  return tokenizer
