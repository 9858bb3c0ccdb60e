"""Pre-training the world model: a small Llama that answers the world's questions.

Each training sequence is "question answer" tokenized exactly as an edit is (`tokenize_edit`: BOS +
question + " " + answer), and the loss is the token-mean cross-entropy on the answer tokens only.
Why answer-only: the question words are fixed templates (nothing to learn) and the subject names are
random syllables (unpredictable, their loss would only add noise); every gradient goes into the
facts, which is what the edits and their evaluation score. The sequences are every fact under the
three training templates; locality questions are such questions about pool subjects, so they are in.

Optimizer: AdamW with linear warmup and cosine decay, global-norm clipping. The train step is jitted
over a fixed [batch, seq_len] shape. Orbax checkpoints (params, optimizer state, step) are written
every `ckpt_every` steps; a restarted run resumes from the latest one and replays the same data
order (epoch permutations are a function of the seed and the epoch index).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from horse_jax.data.tokenize import IGNORE, EditBatch, tokenize_edits
from horse_jax.models import Model, apply, hidden_before
from horse_jax.models.hooks import Tap
from horse_jax.models.transformer import arch
from horse_jax.models.config import ModelConfig
from horse_jax.models.init import init_llama_params


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """Model size and optimisation settings of the world model."""

  hidden_size: int = 128
  intermediate_size: int = 768
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2
  seq_len: int = 16  # every training sequence fits (checked)
  batch_size: int = 128
  steps: int = 3000
  peak_lr: float = 3e-3
  warmup_steps: int = 100
  end_lr_ratio: float = 0.05
  weight_decay: float = 0.01
  max_grad_norm: float = 1.0
  ckpt_every: int = 200


def model_config(cfg: PretrainConfig, vocab_size: int, special: dict[str, int]) -> ModelConfig:
  """The Llama config of the world model (untied head, GQA, rope)."""
  import json
  head_dim = cfg.hidden_size // cfg.num_heads
  hf = {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": head_dim, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
      "hidden_act": "silu", "rope_theta": 10000.0, "tie_word_embeddings": False,
      "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32", **special,
  }
  return ModelConfig(
      model_type="llama", vocab_size=vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, num_layers=cfg.num_layers,
      num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=head_dim,
      max_position_embeddings=128, norm_eps=1e-6, bos_token_id=special["bos_token_id"],
      eos_token_id=special["eos_token_id"], pad_token_id=special["pad_token_id"],
      hf_config_json=json.dumps(hf, sort_keys=True))


def answer_positions(labels_BxT: np.ndarray, width: int = 4) -> tuple[np.ndarray, np.ndarray]:
  """Indices of the labelled positions of each row, padded to `width` (NumPy, done once).

  Returns:
    (positions [B, width] int32, valid [B, width] bool); padded slots point at position 0.
  """
  valid_BxT = labels_BxT != IGNORE
  counts = valid_BxT.sum(1)
  if counts.max() > width:
    raise ValueError(f"an answer has {counts.max()} tokens; raise width above {width}")
  pos = np.zeros((labels_BxT.shape[0], width), np.int32)
  ok = np.arange(width)[None, :] < counts[:, None]
  rows, cols = np.nonzero(valid_BxT)
  slot = np.concatenate([np.arange(c) for c in counts]) if len(rows) else np.zeros(0, int)
  pos[rows, slot] = cols
  return pos, ok


def answer_loss(model: Model, ids_BxT, mask_BxT, pos_BxA, labels_BxA, valid_BxA) -> jax.Array:
  """Token-mean cross-entropy on the answer positions only.

  The vocabulary projection is applied only at the (few) answer positions: a plain forward pass
  would spend a quarter of the pre-training compute on logits nobody reads.
  """
  cfg = model.config
  h_BxTxD = hidden_before(model, cfg.num_layers, ids_BxT, mask_BxT)
  h_BxAxD = jnp.take_along_axis(h_BxTxD, pos_BxA[:, :, None], axis=1)
  logits_BxAxV = arch(cfg).head(model.params, cfg, h_BxAxD, Tap(None)).astype(jnp.float32)
  nll_BxA = optax.softmax_cross_entropy_with_integer_labels(logits_BxAxV, labels_BxA)
  return jnp.sum(nll_BxA * valid_BxA) / jnp.maximum(jnp.sum(valid_BxA), 1)


def make_optimizer(cfg: PretrainConfig) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.peak_lr, cfg.warmup_steps, cfg.steps, cfg.peak_lr * cfg.end_lr_ratio)
  # No weight decay on norm scales (1-d leaves).
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)
  return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                     optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=cfg.weight_decay,
                                 mask=decay_mask))


def make_train_step(config: ModelConfig, tx: optax.GradientTransformation) -> Callable:
  """A jitted (params, opt_state, ids, mask, pos, labels, valid) -> (params, opt_state, loss)."""

  def step(params, opt_state, ids, mask, pos, labels, valid):
    loss, grads = jax.value_and_grad(
        lambda p: answer_loss(Model(p, config), ids, mask, pos, labels, valid))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]], seq_len: int) -> EditBatch:
  """Tokenizes (question, answer) pairs into one right-padded EditBatch of length seq_len."""
  return tokenize_edits(tokenizer, [q for q, _ in pairs], [a for _, a in pairs], pad_to=seq_len)


def _save(manager, step, params, opt_state):
  import orbax.checkpoint as ocp
  manager.save(step, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))


def pretrain(tokenizer, pairs: Sequence[tuple[str, str]], cfg: PretrainConfig, *, seed: int = 0,
             ckpt_dir: str | None = None, log: Callable[[str], None] = print,
             eval_every: int = 0, eval_fn: Callable[[Model], str] | None = None) -> Model:
  """Trains the world model from scratch (or resumes from `ckpt_dir`).

  Args:
    tokenizer: a transformers tokenizer (BOS-prepending, byte-level BPE).
    pairs: (question, answer) training pairs.
    cfg: sizes and optimisation settings.
    seed: init and data-order seed.
    ckpt_dir: orbax checkpoint folder; resumes from its latest step when present.
    log: where progress lines go.
    eval_every: call `eval_fn` every this many steps (0: never).
    eval_fn: model -> a line to log (e.g. accuracies on a sample).

  Returns:
    The trained float32 model.
  """
  special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
             "pad_token_id": tokenizer.pad_token_id}
  config = model_config(cfg, len(tokenizer), special)
  data = encode_pairs(tokenizer, pairs, cfg.seq_len)
  n = data.input_ids.shape[0]
  pos, valid = answer_positions(data.labels)
  answer_labels = np.where(valid, np.take_along_axis(data.labels, pos, axis=1), 0).astype(np.int32)
  params = init_llama_params(config, jax.random.PRNGKey(seed))
  tx = make_optimizer(cfg)
  opt_state = tx.init(params)
  start = 0
  manager = None
  if ckpt_dir:
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager(
        os.path.abspath(ckpt_dir), options=ocp.CheckpointManagerOptions(max_to_keep=1))
    latest = manager.latest_step()
    if latest is not None:
      target = {"params": params, "opt_state": opt_state}
      restored = manager.restore(latest, args=ocp.args.StandardRestore(target))
      params, opt_state, start = restored["params"], restored["opt_state"], int(latest)
      log(f"resumed pre-training from step {start} ({ckpt_dir})")
  step_fn = make_train_step(config, tx)
  per_epoch = n // cfg.batch_size
  t0 = time.time()
  bar = tqdm(range(start, cfg.steps), desc="pretrain", initial=start, total=cfg.steps,
             mininterval=2.0)
  loss_avg = None
  for step in bar:
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    idx = perm[k * cfg.batch_size:(k + 1) * cfg.batch_size]
    params, opt_state, loss = step_fn(params, opt_state, data.input_ids[idx],
                                      data.attention_mask[idx], pos[idx], answer_labels[idx],
                                      valid[idx])
    if step % 50 == 0 or step == cfg.steps - 1:
      loss_avg = float(loss)
      bar.set_postfix(loss=f"{loss_avg:.4f}")
    if eval_fn is not None and eval_every and (step + 1) % eval_every == 0:
      log(f"step {step + 1} ({time.time() - t0:.0f}s): {eval_fn(Model(params, config))}")
    if manager is not None and (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.steps:
      _save(manager, step + 1, params, opt_state)
  if manager is not None:
    manager.wait_until_finished()
  log(f"pre-training: {cfg.steps - start} steps in {time.time() - t0:.0f}s, last loss {loss_avg}")
  return Model(params, config)


# ---------------------------------------------------------------------------------------------
# Evaluation of the pre-trained model on (question, answer) pairs.


def _bucket_batches(tokenizer, pairs, batch_size):
  for i in range(0, len(pairs), batch_size):
    chunk = list(pairs[i:i + batch_size])
    real = len(chunk)
    chunk += [chunk[-1]] * (batch_size - real)  # keep one compiled shape
    yield real, tokenize_edits(tokenizer, [q for q, _ in chunk], [a for _, a in chunk], pad_to=32)


def answer_accuracy(model: Model, tokenizer, pairs: Sequence[tuple[str, str]],
                    batch_size: int = 512) -> dict[str, float]:
  """Teacher-forced and greedy accuracy of the answers.

  Returns:
    {"token_acc": mean over pairs of the share of answer tokens predicted (teacher-forced),
     "full_answer_acc": share of pairs whose every answer token is predicted (teacher-forced),
     "greedy_exact": share of pairs whose greedy continuation of len(answer) tokens equals it}.
  """

  @jax.jit
  def logits_fn(params, ids, mask):
    return apply(Model(params, model.config), ids, mask)

  token_acc, full_acc, greedy = [], [], []
  for real, batch in _bucket_batches(tokenizer, pairs, batch_size):
    logits = np.asarray(logits_fn(model.params, batch.input_ids, batch.attention_mask))
    pred = logits.argmax(-1)
    valid = batch.labels != IGNORE
    hit = (pred == batch.labels) & valid
    per_tok = hit.sum(1) / valid.sum(1)
    token_acc.extend(per_tok[:real])
    full_acc.extend((per_tok == 1.0)[:real])
    # Greedy: feed the model's own tokens after the prompt, one position at a time.
    ids = batch.input_ids.copy()
    mask = batch.attention_mask.copy()
    n_ans = valid.sum(1)
    plen = batch.prompt_len
    ok = np.ones(len(ids), bool)
    rows = np.arange(len(ids))
    for j in range(int(n_ans.max())):
      step_logits = np.asarray(logits_fn(model.params, ids, mask))
      pos = plen - 1 + j
      nxt = step_logits[rows, pos].argmax(-1)
      active = j < n_ans
      ok &= ~active | (nxt == batch.labels[rows, pos])
      write = active & (pos + 1 < ids.shape[1])
      ids[rows[write], pos[write] + 1] = nxt[write]
    greedy.extend(ok[:real])
  return {"token_acc": float(np.mean(token_acc)), "full_answer_acc": float(np.mean(full_acc)),
          "greedy_exact": float(np.mean(greedy))}
