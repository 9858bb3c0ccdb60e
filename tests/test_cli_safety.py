"""The console script as a user runs it (subprocesses): outputs never clobber, interrupts leave
nothing that looks finished, explicit choices, team-readable files, progress, messages that name
the cause. Each test states the probe (command) it runs and what it must print."""

import hashlib
import fcntl
import json
import os
import pty
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import termios
import time

import numpy as np
import pytest
from _eval_helpers import word_tokenizer

from horse_jax.models import save_pretrained
from horse_jax.models.init import random_model, tiny_llama_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = os.path.join(ROOT, "checkpoints", "world")
WORDS = ["what", "is", "the", "colour", "of", "tell", "me", "which", "city", "has", "?", "q"] + \
    [f"s{i}" for i in range(12)] + [f"a{i}" for i in range(6)]
HOREN = ["--set", "editor.n_iter=2", "--set", "editor.initial_capacity=4"]
MALMEN = ["--set", "editor.rank=4", "--set", "data.batch_size=4",
          "--set", "model.edit_modules=[model.layers.1.mlp.down_proj]"]


def tree_hash(path) -> str:
  """sha256 over every file's relative path, bytes and mode under `path` (a file or a folder)."""
  digest = hashlib.sha256()
  path = str(path)
  entries = [path] if os.path.isfile(path) else sorted(
      os.path.join(d, f) for d, _, files in os.walk(path) for f in files)
  for file in entries:
    digest.update(os.path.relpath(file, path).encode())
    digest.update(oct(os.stat(file).st_mode).encode())
    with open(file, "rb") as f:
      digest.update(f.read())
  return digest.hexdigest()


def env():
  return dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
              JAX_PLATFORMS="cpu")


def cli(*args, timeout=240, umask=None):
  """Runs `horse-jax ARGS` (python -m horse_jax.cli.main) with stdout/stderr captured."""
  old = os.umask(umask) if umask is not None else None  # the child inherits it
  try:
    return subprocess.run([sys.executable, "-m", "horse_jax.cli.main", *map(str, args)],
                          capture_output=True, text=True, env=env(), timeout=timeout, cwd=ROOT)
  finally:
    if old is not None:
      os.umask(old)


def cli_tty(*args, timeout=240):
  """Runs `horse-jax ARGS` with stderr on a pseudo-terminal; returns (exit code, what it drew)."""
  master, slave = pty.openpty()
  fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 x 120 characters
  proc = subprocess.Popen([sys.executable, "-m", "horse_jax.cli.main", *map(str, args)],
                          stdout=subprocess.DEVNULL, stderr=slave, env=env(), cwd=ROOT)
  os.close(slave)
  chunks, deadline = [], time.time() + timeout
  while time.time() < deadline:
    ready, _, _ = select.select([master], [], [], 0.5)
    if ready:
      try:
        data = os.read(master, 65536)
      except OSError:  # the child closed the terminal
        break
      if not data:
        break
      chunks.append(data)
    elif proc.poll() is not None:
      break
  os.close(master)
  return proc.wait(timeout=30), b"".join(chunks).decode(errors="replace")


def one_error_line(proc, *needles):
  """The run refused with exit 2 and one line on stderr naming every needle."""
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, (proc.returncode, proc.stderr)
  assert len(lines) == 1 and lines[0].startswith("horse-jax: error:"), proc.stderr
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
  root = tmp_path_factory.mktemp("safety")
  tok = word_tokenizer(WORDS)
  tok.save_pretrained(str(root / "tok"))
  save_pretrained(random_model(tiny_llama_config(vocab_size=len(tok), num_layers=2), seed=0),
                  str(root / "llama"), tokenizer_src=str(root / "tok"))
  rng = np.random.default_rng(0)
  rows = [{"src": f"what is the colour of s{i} ?", "alt": f"a{rng.integers(6)}",
           "rephrase": f"tell me the colour of s{i} ?", "loc": f"q which city has s{i + 6}",
           "loc_ans": f"a{rng.integers(6)}"} for i in range(4)]
  (root / "data").mkdir()
  (root / "data" / "zsre.json").write_text(json.dumps(rows))
  user = root / "user"  # a user's folder with work in it
  user.mkdir()
  (user / "notes.txt").write_text("my results\n")
  (user / "model").mkdir()
  (user / "model" / "weights.bin").write_bytes(b"\x00" * 64)
  return root


def edit_args(ws, method, out, *extra):
  return ["edit", "--method", method, "--model", ws / "llama", "--data", ws / "data" / "zsre.json",
          "--out", out, *(HOREN if method in ("horen", "grace") else MALMEN), *extra]


# 1. Outputs never clobber; the demo world and a user folder survive every misuse (hashes).
def test_outputs_never_clobber(ws):
  world, user, model = tree_hash(WORLD), tree_hash(ws / "user"), tree_hash(ws / "llama")
  data = ws / "data" / "zsre.json"
  # an existing non-empty folder, without --overwrite
  one_error_line(cli(*edit_args(ws, "horen", ws / "user")), "not empty", "--overwrite")
  # --out is an input: refused even with --overwrite (inside / containing: test_overlap_rules)
  one_error_line(cli(*edit_args(ws, "horen", ws / "llama", "--overwrite")), "input --model")
  # the slip of the issue: the world folder as --out of an edit of the world's model
  one_error_line(cli("edit", "--method", "horse", "--model", f"{WORLD}/model", "--data",
                     f"{WORLD}/data/zsre_test.json", "--hypernet", f"{WORLD}/hypernet",
                     "--out", WORLD, "--overwrite"), "--out", "contains the input")
  one_error_line(cli("world", "build"), "checkpoints/world", "not empty")
  one_error_line(cli("convert", ws / "llama", ws / "user"), "OUT", "not empty")
  from horse_jax.cli.main import main  # the same refusals in-process (cheaper than a subprocess)
  assert main(["demo", "--out", f"{WORLD}/runs"]) == 2
  assert main(["eval", "--model", str(ws / "llama"), "--data", str(data), "--method", "unedited",
               "--n-edits", "1", "--out", str(ws / "user")]) == 2
  assert main(["bench", "--out", str(ws / "user")]) == 2
  one_error_line(cli("train", "--model", ws / "llama", "--data", data, "--method", "malmen",
                     "--out", ws / "user", "--steps", "1"), "--overwrite")
  assert (tree_hash(WORLD), tree_hash(ws / "user"), tree_hash(ws / "llama")) == (world, user, model)


def test_overlap_rules(ws, tmp_path):
  """--out may not be, lie inside or contain an input folder, nor be a data file's folder; a data
  file's parents are fine (a run folder under the folder holding the data)."""
  from horse_jax.errors import UserError
  from horse_jax.outputs import prepare_output
  inputs = {"--model": ws / "llama", "--data": ws / "data" / "zsre.json", "--hypernet": "init"}
  for out, why in ((ws / "llama", "is the input --model"), (ws / "llama" / "x", "inside the input --model"),
                   (ws, "contains the input --model"), (ws / "data", "holds the input --data")):
    with pytest.raises(UserError, match=why):
      prepare_output(out, inputs=inputs, overwrite=True)
  assert prepare_output(ws / "data" / "runs" / "x", inputs=inputs) == str(ws / "data" / "runs" / "x")
  with pytest.raises(UserError, match="is a file"):
    prepare_output(ws / "data" / "zsre.json", inputs={})
  empty = tmp_path / "empty"
  empty.mkdir()
  assert prepare_output(empty, inputs=inputs) == str(empty)


# 1, 3, 4, 5, 6. --overwrite replaces a folder whole, with team-readable files, the network that
# was used recorded, progress as log lines off a terminal, and no third-party output.
def test_overwrite_init_hypernet_modes_and_stage_lines(ws):
  out = ws / "replaced"
  shutil.copytree(ws / "user", out)
  proc = cli(*edit_args(ws, "malmen", out, "--hypernet", "init", "--seed", "3", "--overwrite"),
             umask=0o022)
  assert proc.returncode == 0, proc.stderr
  assert not (out / "notes.txt").exists() and (out / "metrics.json").is_file()
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["hypernet"] == {"kind": "initialised", "seed": 3}
  manifest = json.loads((out / "horse-jax.json").read_text())
  assert manifest["finished"] is True and "metrics.json" in manifest["files"]
  for folder, dirs, files in os.walk(out):
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o755, folder
    for name in files:
      assert stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode) == 0o644, name
  assert not [p for p in os.listdir(ws) if p.startswith(".replaced")]  # no temp folder left
  lines = proc.stderr.strip().splitlines()
  # every stderr line is ours (no PyTorch notice, no JAX platform chatter, no warnings)
  assert lines and all(line.startswith("horse-jax: ") for line in lines), proc.stderr
  for stage in ("loading model", "editing 4 records at once", "scoring 4 edits"):
    assert any(line.startswith(f"horse-jax: {stage}") and line.endswith(" s") for line in lines), stage
  assert "malmen: 4 edits" in proc.stdout
  # 2. `info` says finished here, partial where the manifest is missing
  info = cli("info", out)
  assert info.returncode == 0 and "finished" in info.stdout and "llama" in info.stdout
  (out / "horse-jax.json").unlink()
  info = cli("info", out)
  assert info.returncode == 0 and "partial" in info.stdout


# 2. SIGINT / SIGTERM mid-edit: one line, no traceback, exit 130 / 143, no --out folder.
@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "terminated")])
def test_signal_mid_edit_leaves_no_output(ws, signum, code, word):
  out = ws / f"sig{code}" / "out"
  proc = subprocess.Popen([sys.executable, "-m", "horse_jax.cli.main",
                           *map(str, edit_args(ws, "horen", out))], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
  seen = proc.stderr.readline()
  assert seen.startswith("horse-jax: loading model"), seen  # the edit is under way
  time.sleep(0.5)
  proc.send_signal(signum)
  _, rest = proc.communicate(timeout=60)
  assert proc.returncode == code, (proc.returncode, rest)
  lines = [line for line in rest.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith(f"horse-jax: {word}"), rest
  assert "Traceback" not in rest and "Exception ignored" not in rest
  assert not out.exists()
  assert not (out.parent.exists() and os.listdir(out.parent))  # no partial temp folder either


# 3. Explicit choices: a hypernetwork method needs --hypernet; flags of the other family are refused.
def test_explicit_choices(ws):
  one_error_line(cli(*edit_args(ws, "horse", ws / "e1")), "--hypernet", "horse-jax train",
                 "--hypernet init")
  one_error_line(cli(*edit_args(ws, "malmen", ws / "e2", "--codebook", ws / "user")),
                 "--codebook", "--method malmen")
  one_error_line(cli(*edit_args(ws, "grace", ws / "e3", "--hypernet", "init")),
                 "--hypernet", "--method grace")
  one_error_line(cli(*edit_args(ws, "mend", ws / "e4", "--hypernet", "init", "--eval-every", "2")),
                 "--eval-every", "--method mend")
  one_error_line(cli(*edit_args(ws, "horen", ws / "e5", "--max-shard-size", "1GB")),
                 "--max-shard-size", "--method horen")
  one_error_line(cli(*edit_args(ws, "mend", ws / "e6", "--hypernet", "init", "--max-shard-size", "lots")),
                 "--max-shard-size 'lots'", "5GB")
  assert not any((ws / name).exists() for name in ("e1", "e2", "e3", "e4", "e5", "e6"))


# 5. Progress: bars with rate and ETA on a terminal; --quiet draws nothing (off a terminal:
# test_overwrite_... and test_messages_... check the stage lines and their absence under --quiet).
@pytest.mark.slow
def test_progress_bars_on_a_terminal_and_quiet(ws):
  code, drawn = cli_tty(*edit_args(ws, "horen", ws / "tty"))
  assert code == 0, drawn
  assert "horen edits" in drawn and ("edit/s" in drawn or "s/edit" in drawn), drawn
  assert "scoring 4 edits" in drawn and "<" in drawn  # tqdm's elapsed<remaining
  code, drawn = cli_tty(*edit_args(ws, "horen", ws / "quiet", "--quiet"))
  assert code == 0 and drawn.strip() == "", drawn


# 6. Messages that name the cause.
def test_messages_name_the_cause(ws, tmp_path):
  rows = json.loads((ws / "data" / "zsre.json").read_text())
  del rows[2]["alt"]
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps(rows))
  # --quiet: the model loads before the data is read, and no stage line comes before the error
  one_error_line(cli("edit", "--method", "horen", "--model", ws / "llama", "--data", bad,
                     "--out", tmp_path / "o1", "--quiet", *HOREN), "record 2", "missing field 'alt'")
  one_error_line(cli(*edit_args(ws, "horen", tmp_path / "o2", "--n-edits", "0")), "--n-edits")
  proc = cli("--version")
  assert proc.returncode == 0 and proc.stdout.startswith("horse-jax ") and proc.stdout.split()[1][0].isdigit()
  # info on a folder with only config.json, and on a model card name
  only = tmp_path / "config-only"
  only.mkdir()
  shutil.copy(ws / "llama" / "config.json", only / "config.json")
  proc = cli("info", only)
  assert proc.returncode == 0 and "config only" in proc.stdout and proc.stderr == "", proc.stderr
  proc = cli("info", "llama-3-8b")
  assert proc.returncode == 0 and "8030261248" in proc.stdout and proc.stderr == ""
  proc = cli("info", "mistral-7b")
  assert proc.returncode == 0 and "mistral-7b" in proc.stdout


def test_dtype_and_fsdp_have_one_form_everywhere():
  """Every command that loads a model takes --dtype float32|bfloat16|float16; --fsdp is a switch."""
  import argparse
  from horse_jax.cli.main import build_parser
  parser = build_parser()
  commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001
  for name in ("edit", "train", "eval", "demo", "convert", "plan"):
    action = commands[name]._option_string_actions["--dtype"]  # noqa: SLF001
    assert tuple(action.choices) == ("float32", "bfloat16", "float16"), name
  with_fsdp = [n for n, p in commands.items() if "--fsdp" in p._option_string_actions]  # noqa: SLF001
  assert set(with_fsdp) >= {"edit", "train", "eval", "demo", "bench", "plan"}
  for name in with_fsdp:
    action = commands[name]._option_string_actions["--fsdp"]  # noqa: SLF001
    assert isinstance(action, argparse.BooleanOptionalAction), name
