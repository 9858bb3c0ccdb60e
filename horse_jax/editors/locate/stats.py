"""Second-moment statistics C = E[k k^T] of edited modules' inputs over a text corpus, cached.

  texts = read_corpus(path) or world_corpus()      # the embedded default: the world's pre-training text
  covs = layer_moments(model, tokenizer, texts, modules, stats_dir=..., progress=True)

C (uncentred, as the reference's `SecondMoment`) is the mean of x x^T over every non-pad token of
every text (BOS included; texts truncated to the model's max positions), accumulated in float32 by
one jitted program per padded batch shape; every requested module of one pass is collected at once.
Results are cached as `.npy` files under `stats_dir/<model>/<corpus>/<module>.npy`, keyed by a
fingerprint of the model (config and a strided sample of the embedding and the edited kernels) and
of the corpus (its texts and the truncation length), written atomically; a later run reads them.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from horse_jax.errors import UserError
from horse_jax.io import atomic_write_bytes, atomic_write_text

TOKENS_PER_BATCH = 4096


def world_corpus() -> list[str]:
  """The embedded default corpus: the demo world's pre-training text ("question answer" per fact
  and training template; `horse_jax.world.generator.pretraining_pairs` of the shipped world)."""
  from horse_jax.world.generator import build_world, pretraining_pairs  # noqa: PLC0415
  return [f"{q} {a}" for q, a in pretraining_pairs(build_world(0))]


def read_corpus(path: str) -> list[str]:
  """Texts of a corpus file or folder.

  Args:
    path: a `.txt` file (one text per non-empty line), a `.json` / `.jsonl` file of strings or of
      objects with a "text" field, or a `datasets` dataset saved with `save_to_disk` (its "text"
      column; a DatasetDict's "train" split).

  Raises:
    UserError: a missing path, an unknown format or no texts.
  """
  where = f"--stats-corpus {path}"
  if os.path.isdir(path):
    try:
      import datasets  # noqa: PLC0415
      ds = datasets.load_from_disk(path)
    except Exception as err:  # noqa: BLE001  (any reading failure is the user's folder)
      raise UserError(f"{where}: not a dataset saved with save_to_disk ({err})") from None
    if isinstance(ds, datasets.DatasetDict):
      if "train" not in ds:
        raise UserError(f"{where}: a DatasetDict without a 'train' split")
      ds = ds["train"]
    if "text" not in ds.column_names:
      raise UserError(f"{where}: no 'text' column (columns: {', '.join(ds.column_names)})")
    texts = list(ds["text"])
  elif not os.path.isfile(path):
    raise UserError(f"{where}: file not found")
  elif path.endswith((".json", ".jsonl")):
    with open(path, encoding="utf-8") as f:
      raw = f.read()
    try:
      rows = json.loads(raw) if path.endswith(".json") else [json.loads(x) for x in raw.splitlines() if x.strip()]
    except json.JSONDecodeError as err:
      raise UserError(f"{where}: not valid JSON ({err})") from None
    texts = []
    for i, row in enumerate(rows if isinstance(rows, list) else []):
      text = row.get("text") if isinstance(row, dict) else row
      if not isinstance(text, str):
        raise UserError(f"{where}: row {i} is neither a string nor an object with a 'text' string")
      texts.append(text)
  elif path.endswith(".txt"):
    with open(path, encoding="utf-8") as f:
      texts = [line.rstrip("\n") for line in f]
  else:
    raise UserError(f"{where}: expected a .txt, .json or .jsonl file or a saved dataset folder")
  texts = [t for t in texts if t.strip()]
  if not texts:
    raise UserError(f"{where}: no texts")
  return texts


def _fingerprint(parts: Sequence[bytes]) -> str:
  digest = hashlib.sha1()
  for part in parts:
    digest.update(hashlib.sha1(part).digest())
  return digest.hexdigest()[:16]


def model_fingerprint(model, modules: Sequence[str]) -> str:
  """A short hash of the model's config, embedding and the kernels of `modules` (strided samples)."""
  from horse_jax.models import names  # noqa: PLC0415
  parts = [repr(model.config).encode()]
  leaves = [jax.tree_util.tree_leaves(model.params)[0]] + [names.get_kernel(model.params, m)
                                                           for m in modules]
  for leaf in leaves:
    flat = leaf.reshape(-1)
    step = max(flat.shape[0] // 4096, 1)
    parts.append(np.asarray(jax.device_get(flat[::step][:4096]), np.float32).tobytes())
  return _fingerprint(parts)


@functools.partial(jax.jit, static_argnames=("modules", "stop"))
def _batch_moments(model, input_ids, attention_mask, modules: tuple[str, ...], stop: int):
  """{module: sum over real tokens of x x^T [d_in, d_in]} of one padded batch (float32)."""
  from horse_jax.models.hooks import Hooks, Tap  # noqa: PLC0415
  from horse_jax.models.transformer import default_positions, embed, run_layers  # noqa: PLC0415
  positions = default_positions(attention_mask)
  tap = Tap(Hooks(capture=modules))
  run_layers(model, embed(model, input_ids, positions), attention_mask, positions, tap, 0, stop)
  m = attention_mask.astype(jnp.float32)[..., None]
  out = {}
  for name in modules:
    x = tap.captured[name].astype(jnp.float32)
    out[name] = jnp.einsum("btd,bte->de", x * m, x, precision=jax.lax.Precision.HIGHEST)
  return out


def accumulate_moments(model, batches, modules: Sequence[str], bar=None) -> dict[str, np.ndarray]:
  """C per module: sum of x x^T over real tokens / their count (float32).

  Args:
    model: the Model.
    batches: iterable of (input_ids [B, T], attention_mask [B, T]) NumPy arrays.
    modules: linear module names (HF) whose inputs are collected.
    bar: optional progress bar (`.update(n_texts)`).
  """
  from horse_jax.models.names import layer_index  # noqa: PLC0415
  modules = tuple(modules)
  stop = max(layer_index(m) for m in modules) + 1
  sums = None
  count = 0
  for ids, mask in batches:
    part = _batch_moments(model, jnp.asarray(ids), jnp.asarray(mask), modules, stop)
    sums = part if sums is None else {k: sums[k] + part[k] for k in modules}
    count += int(mask.sum())
    if bar is not None:
      bar.update(ids.shape[0])
  if not count:
    raise UserError("statistics corpus: no tokens")
  return {k: np.asarray(jax.device_get(v), np.float32) / np.float32(count) for k, v in sums.items()}


def corpus_batches(tokenizer, texts: Sequence[str], max_len: int,
                   tokens_per_batch: int = TOKENS_PER_BATCH):
  """Right-padded (input_ids, attention_mask) batches of `texts` (BOS added, truncated to
  `max_len`), sorted by length, power-of-two lengths and row counts (few compiled shapes)."""
  from horse_jax.data.tokenize import bucket_length, padding_id  # noqa: PLC0415
  seqs = [list(tokenizer(t)["input_ids"])[:max_len] for t in texts]
  order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
  pad = padding_id(tokenizer)
  i = 0
  while i < len(order):
    width = min(bucket_length(len(seqs[order[i]])), max(max_len, 1))
    width = max(width, len(seqs[order[i]]))
    rows = max(1, tokens_per_batch // width)
    rows = 1 << (rows.bit_length() - 1)  # a power of two
    chunk = order[i:i + rows]
    ids = np.full((rows, width), pad, np.int32)
    mask = np.zeros((rows, width), np.int32)
    for r, j in enumerate(chunk):
      ids[r, :len(seqs[j])], mask[r, :len(seqs[j])] = seqs[j], 1
    yield ids, mask
    i += len(chunk)


def layer_moments(model, tokenizer, texts: Sequence[str], modules: Sequence[str], *,
                  stats_dir: str | None, corpus_name: str = "corpus",
                  progress: bool = False) -> dict[str, np.ndarray]:
  """C = E[x x^T] of each module's input over `texts`, read from / written to the cache.

  Args:
    model: the unedited Model.
    tokenizer: its tokenizer.
    texts: the corpus (already limited to the texts to use).
    modules: linear module names (HF).
    stats_dir: cache folder (None: no cache).
    corpus_name: shown in the progress bar and written beside the cache files.
    progress: draw a progress bar.

  Returns:
    {module: [d_in, d_in] float32}.
  """
  from horse_jax import progress as progress_lib  # noqa: PLC0415
  max_len = int(model.config.max_position_embeddings)
  out, todo, paths = {}, [], {}
  if stats_dir:
    corpus_fp = _fingerprint([str(max_len).encode()] + [t.encode() for t in texts])
    folder = os.path.join(stats_dir, model_fingerprint(model, modules), corpus_fp)
    for m in modules:
      paths[m] = os.path.join(folder, f"{m}.npy")
      if os.path.isfile(paths[m]):
        out[m] = np.load(paths[m])
      else:
        todo.append(m)
  else:
    todo = list(modules)
  if todo:
    bar = progress_lib.bar(total=len(texts), desc=f"second moments over {corpus_name}", unit="text",
                           disable=not progress)
    fresh = accumulate_moments(model, corpus_batches(tokenizer, texts, max_len), todo, bar)
    bar.close()
    for m, c in fresh.items():
      out[m] = c
      if stats_dir:
        buf = io.BytesIO()
        np.save(buf, c)
        atomic_write_bytes(paths[m], buf.getvalue())
        atomic_write_text(os.path.join(os.path.dirname(paths[m]), "corpus.json"), json.dumps(
            {"corpus": corpus_name, "texts": len(texts), "max_len": max_len}) + "\n")
  return out
