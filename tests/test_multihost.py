"""Multi-host on JAX's own runtime: two local processes x 4 CPU devices (gloo) on one 2x4 mesh.

Every process runs the same `horse-jax edit` (HORSE, HoReN); only process 0 writes (process 1 is given another
--out to prove it writes nothing) and the result equals the single-process one. `horse-jax train` (both
processes save orbax checkpoints into one folder, resume included) and `horse-jax eval` likewise.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from horse_jax.cli.main import main
from horse_jax.models import save_pretrained
from horse_jax.models.init import random_model, tiny_llama_config
from test_cli_train_edit import tiny_tokenizer, zsre_rows

EDIT = {
    "horse": ["--method", "horse", "--hypernet", "init", "--set", "data.batch_size=4", "--set", "editor.rank=16",
              "--set", "editor.lr=1e-2",
              "--set", "model.edit_modules=[model.layers.1.mlp.down_proj,model.layers.2.mlp.down_proj]"],
    "horen": ["--method", "horen"],
}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["horse", "horen"])
def test_two_processes_write_one_folder_equal_to_one_process(tmp_path, method):
  tok, vocab = tiny_tokenizer()
  tok.save_pretrained(str(tmp_path / "tok"))
  save_pretrained(random_model(tiny_llama_config(vocab_size=vocab, num_layers=3), seed=1),
                  str(tmp_path / "llama"), tokenizer_src=str(tmp_path / "tok"))
  (tmp_path / "edits.json").write_text(json.dumps(zsre_rows(np.random.default_rng(1), 8)))
  common = ["edit", "--model", str(tmp_path / "llama"), "--data", str(tmp_path / "edits.json"), *EDIT[method]]
  assert main([*common, "--out", str(tmp_path / "single")]) == 0

  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
  env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
  procs = []
  for i in range(2):
    out = tmp_path / ("multi" if i == 0 else "multi_process1")
    cmd = [sys.executable, "-m", "horse_jax.cli.main", *common, "--out", str(out), "--mesh", "2x4",
           "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)]
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True))
  logs = [p.communicate(timeout=900)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs
  assert f"{method}: 8 edits" in logs[0] and f"{method}: 8 edits" not in logs[1]  # process 0 logs

  assert not (tmp_path / "multi_process1").exists()  # process 1 wrote nothing
  assert sorted(os.listdir(tmp_path / "multi")) == sorted(os.listdir(tmp_path / "single"))
  from safetensors.numpy import load_file
  ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("single", "multi"))
  assert ma["summary"] == mb["summary"] and ma["records"] == mb["records"]
  if method == "horen":
    a, b = (load_file(str(tmp_path / d / "codebook" / "codebook.safetensors")) for d in ("single", "multi"))
    assert sorted(a) == sorted(b) and int(a["count"][0]) > 1
    for name in a:
      np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-5)
    return
  a, b = (load_file(str(tmp_path / d / "deltas.safetensors")) for d in ("single", "multi"))
  assert sorted(a) == sorted(b)
  for name in a:
    assert np.abs(a[name]).max() > 0
    np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-4 * np.abs(a[name]).max())
  wa, wb = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("single", "multi"))
  for name in wa:
    np.testing.assert_allclose(wb[name], wa[name], rtol=1e-5, atol=1e-6)


TRAIN = ["--method", "horse", "--save-every", "2", "--seed", "3", "--set", "data.n_edits=8",
         "--set", "data.batch_size=4", "--set", "editor.rank=16", "--set", "editor.meta_lr=1e-3",
         "--set", "editor.batch_size=16",
         "--set", "model.edit_modules=[model.layers.1.mlp.down_proj,model.layers.2.mlp.down_proj]"]
# Each process runs its commands in one interpreter (one JAX runtime, compiled programs reused).
DRIVER = ("import json, sys, time\nfrom horse_jax.cli.main import main\n"
          "for command in json.loads(sys.argv[1]):\n  start = time.time()\n  rc = main(command)\n"
          "  print(f'driver: {command[0]} rc {rc} in {time.time() - start:.1f} s', flush=True)\n"
          "  if rc:\n    sys.exit(rc)\n")


def _cpu_env():
  """Environment of a process with 4 CPU devices that reaches the others over gloo."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
  env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
  return env


def _launch_two(commands_of, timeout=600):
  """Runs DRIVER in two processes x 4 CPU devices joined on a 2x4 mesh; returns their logs."""
  port = _free_port()
  env = _cpu_env()
  flags = ["--mesh", "2x4", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
  procs = [subprocess.Popen([sys.executable, "-c", DRIVER,
                             json.dumps([[*c, *flags, "--process-id", str(i)] for c in commands_of(i)])],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=timeout)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-4000:] for log in logs)
  return logs


def _metrics_rows(path):
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  for row in rows:
    row.pop("seconds")  # wall time
  return rows


def _hypernet_leaves(path):
  import jax
  from horse_jax.editors.hypernet.checkpoint import load_hypernet
  _, state, _ = load_hypernet(path)
  return [np.asarray(x) for x in jax.tree_util.tree_leaves((state.nets, state.norms))]


@pytest.mark.slow
def test_two_processes_train_resume_and_eval_like_one_process(tmp_path):
  tok, vocab = tiny_tokenizer()
  tok.save_pretrained(str(tmp_path / "tok"))
  save_pretrained(random_model(tiny_llama_config(vocab_size=vocab, num_layers=3), seed=0),
                  str(tmp_path / "llama"), tokenizer_src=str(tmp_path / "tok"))
  rng = np.random.default_rng(0)
  for name, n in (("train.json", 40), ("valid.json", 12)):
    (tmp_path / name).write_text(json.dumps(zsre_rows(rng, n)))
  data = ["--model", str(tmp_path / "llama"), "--data", str(tmp_path / "train.json"),
          "--valid", str(tmp_path / "valid.json")]

  def train(out, steps):
    return ["train", *data, *TRAIN, "--out", str(out), "--steps", str(steps)]

  # The sweep edits with the single-process hypernetwork in both runs, so the scores can be equal.
  (tmp_path / "sweep.yaml").write_text(json.dumps({
      "name": "mh", "model": str(tmp_path / "llama"), "data": str(tmp_path / "valid.json"),
      "n_edits": [8], "seeds": [0],
      "methods": ["unedited", {"name": "horse", "hypernet": str(tmp_path / "single" / "hypernet")}]}))

  def sweep(out):
    return ["eval", "--config", str(tmp_path / "sweep.yaml"), "--out", str(out), "--quiet"]

  assert main(train(tmp_path / "single", 3)) == 0
  assert main(sweep(tmp_path / "single_eval")) == 0

  # Both processes train into the same folder (orbax saves collectively): 2 steps, then resume to 3.
  # The sweep's process 1 is given another --out to prove it writes nothing.
  logs = _launch_two(lambda i: [train(tmp_path / "multi", 2), train(tmp_path / "multi", 3),
                                sweep(tmp_path / ("multi_eval" if i == 0 else "multi_eval_process1"))])
  print("\n".join(line for line in logs[0].splitlines() if line.startswith("driver:")))
  for text in ("resuming from step 2", "hypernetwork ->", "wrote "):
    assert text in logs[0] and text not in logs[1]  # process 0 alone prints
  assert "train horse" not in logs[1]  # no progress bar on process 1

  single, multi = tmp_path / "single", tmp_path / "multi"
  assert sorted(os.listdir(multi)) == sorted(os.listdir(single))
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]  # atomic folder swaps done
  assert sorted(os.listdir(multi / "checkpoints")) == sorted(os.listdir(single / "checkpoints"))
  assert json.loads((multi / "run.json").read_text()) == json.loads((single / "run.json").read_text())
  rows_single, rows_multi = _metrics_rows(single / "metrics.jsonl"), _metrics_rows(multi / "metrics.jsonl")
  assert [sorted(r) for r in rows_multi] == [sorted(r) for r in rows_single]
  assert [r["step"] for r in rows_multi] == [1, 2, 3] and "valid_edit_acc" in rows_multi[1]
  for a, b in zip(rows_single, rows_multi):
    for key in a:  # float32 losses summed in another order over the 2x4 mesh
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=key)
  leaves_single, leaves_multi = _hypernet_leaves(single / "hypernet"), _hypernet_leaves(multi / "hypernet")
  assert len(leaves_single) == len(leaves_multi)
  for a, b in zip(leaves_single, leaves_multi):
    # Adam divides by sqrt(v): a gradient entry near zero, summed in another order over the mesh,
    # moves its weight by a few 1e-4 of the leaf's scale; the leaf as a whole agrees to 1e-4.
    assert np.linalg.norm(b - a) <= 1e-4 * np.linalg.norm(a)
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3 * np.abs(a).max())
  assert any(np.abs(a).max() > 0 for a in leaves_multi)

  assert not (tmp_path / "multi_eval_process1").exists()
  ea, eb = tmp_path / "single_eval", tmp_path / "multi_eval"
  files = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())  # noqa: E731
  assert files(eb) == files(ea) and any(f.startswith("cells/") for f in files(ea))
  ra, rb = (json.loads((d / "results.json").read_text()) for d in (ea, eb))
  assert [c["method"] for c in rb["cells"]] == [c["method"] for c in ra["cells"]] == ["unedited", "horse"]
  assert [c["summary"] for c in rb["cells"]] == [c["summary"] for c in ra["cells"]]
  no_time = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
  assert no_time(rb["aggregate"]) == no_time(ra["aggregate"])
  ca, cb = (json.loads(next(d.rglob("horse/n8_seed0_at_once.json")).read_text()) for d in (ea, eb))
  assert ca["records"] == cb["records"] and ca["summary"]["edit_acc"] is not None


@pytest.mark.slow
def test_train_refuses_different_out_folders(tmp_path):
  # Checked before the model loads: any folder names do, nothing is read or written.
  port = _free_port()
  env = _cpu_env()
  procs = [subprocess.Popen([sys.executable, "-m", "horse_jax.cli.main", "train", "--model", str(tmp_path / "m"),
                             "--data", str(tmp_path / "d.json"), "--method", "horse",
                             "--out", str(tmp_path / f"out{i}"), "--mesh", "2x4",
                             "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [2, 2], logs
  assert all("--out must be the same folder on every process" in log for log in logs)
  assert not list(tmp_path.iterdir())


def _tiny_world(tmp_path, n_records):
  tok, vocab = tiny_tokenizer()
  tok.save_pretrained(str(tmp_path / "tok"))
  save_pretrained(random_model(tiny_llama_config(vocab_size=vocab, num_layers=3), seed=1),
                  str(tmp_path / "llama"), tokenizer_src=str(tmp_path / "tok"))
  (tmp_path / "edits.json").write_text(json.dumps(zsre_rows(np.random.default_rng(1), n_records)))
  return ["edit", "--model", str(tmp_path / "llama"), "--data", str(tmp_path / "edits.json"), "--method", "horen"]


def _start(command, i, port, n=2, extra=()):
  return subprocess.Popen([sys.executable, "-m", "horse_jax.cli.main", *command, "--coordinator", f"127.0.0.1:{port}",
                           "--num-processes", str(n), "--process-id", str(i), *extra],
                          env=_cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _one_error_line(log):
  lines = [line for line in log.splitlines() if line.strip()]
  errors = [line for line in lines if "error" in line.lower() or "Traceback" in line or line.startswith(("F", "E1", "W1", "***", "    @"))]
  assert len(errors) == 1 and errors[0].startswith("horse-jax: error: multi-host: "), log[-3000:]
  return errors[0]


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_process_stops_the_other_within_60_s_with_one_line(tmp_path, victim):
  import signal
  import time
  command = _tiny_world(tmp_path, 256)
  port = _free_port()
  procs = [_start([*command, "--out", str(tmp_path / f"out{i}")], i, port, extra=["--mesh", "2x4"]) for i in range(2)]
  survivor = procs[1 - victim]
  # Mid-edit: the model is loaded (process 0 prints the stage's time), the 256 edits are running.
  seen = []
  for line in procs[0].stdout:
    seen.append(line)
    if "loading model" in line:
      break
  assert any("loading model" in line for line in seen), "".join(seen)
  time.sleep(2)
  procs[victim].send_signal(signal.SIGKILL)
  killed_at = time.monotonic()
  log = "".join(seen) if survivor is procs[0] else ""
  log += survivor.communicate(timeout=120)[0]
  waited = time.monotonic() - killed_at
  procs[victim].communicate()
  assert survivor.returncode != 0 and waited < 60, (survivor.returncode, waited, log[-3000:])
  line = _one_error_line(log)
  assert ("lost process 1" in line) if victim == 1 else ("lost the coordinator" in line), line
  print(f"survivor exit {survivor.returncode} after {waited:.1f} s: {line}")


@pytest.mark.slow
def test_sigterm_ends_both_processes_mid_edit_with_one_line_and_no_gloo_notices(tmp_path):
  # The runtime's preemption notifier takes SIGTERM at `jax.distributed.initialize`; the command
  # keeps it, so a scheduler's SIGTERM ends a run that waits inside a collective.
  import signal
  import time
  command = _tiny_world(tmp_path, 256)
  port = _free_port()
  procs = [_start([*command, "--out", str(tmp_path / f"out{i}")], i, port, extra=["--mesh", "2x4"]) for i in range(2)]
  seen = []
  for line in procs[0].stdout:
    seen.append(line)
    if "loading model" in line:
      break
  time.sleep(3)
  for p in procs:
    p.send_signal(signal.SIGTERM)
  sent_at = time.monotonic()
  logs = [p.communicate(timeout=60)[0] for p in procs]
  waited = time.monotonic() - sent_at
  logs[0] = "".join(seen) + logs[0]
  assert [p.returncode for p in procs] == [143, 143] and waited < 10, (waited, logs)
  for log in logs:
    assert "Gloo" not in log and "peer ranks" not in log, log
    assert [line for line in log.splitlines() if "horse-jax: terminated" in line] == [
        "horse-jax: terminated (SIGTERM); no output folder was finished"], log
  assert not [p for p in tmp_path.iterdir() if p.name.startswith("out")]


def test_stdout_filter_drops_interleaved_gloo_notices_only():
  import threading
  from horse_jax.cli import lost_process
  notice = b"[Gloo] Rank %d is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\n"
  stream = (b"[Gloo] Rank " + notice % 0 + b"1 is connected to 1 peer ranks. Expected number of connected peer "
            b"ranks is : 1\n" + notice % 1 + b"horen: 8 edits  ES 1.0 (1 rank)\n\nlast")
  source_r, source_w = os.pipe()
  sink_r, sink_w = os.pipe()
  with os.fdopen(source_r, "rb", buffering=0) as source, os.fdopen(sink_w, "wb") as sink:
    thread = threading.Thread(target=lost_process.run, args=("0", "", source, sink, False))
    thread.start()
    os.write(source_w, stream)
    os.close(source_w)
    thread.join(timeout=30)
  with os.fdopen(sink_r, "rb") as out:
    assert out.read() == b"horen: 8 edits  ES 1.0 (1 rank)\n\nlast"


@pytest.mark.slow
@pytest.mark.parametrize("flag,values", [("--num-processes", ("2", "3")), ("--mesh", ("2x4", "1x8"))])
def test_processes_that_disagree_refuse_at_start(tmp_path, flag, values):
  import time
  command = _tiny_world(tmp_path, 8)
  port = _free_port()
  procs = []
  for i, value in enumerate(values):
    n = int(value) if flag == "--num-processes" else 2
    mesh = [] if flag == "--num-processes" else ["--mesh", value]
    procs.append(_start([*command, "--out", str(tmp_path / f"out{i}"), *mesh], i, port, n=n))
  start = time.monotonic()
  logs = [p.communicate(timeout=180)[0] for p in procs]
  assert [p.returncode for p in procs] == [2, 2], logs
  for log in logs:
    line = _one_error_line(log)
    assert "runs with other settings" in line and ("num_processes" in line or "mesh" in line), line
  assert time.monotonic() - start < 60, logs
  assert not [p for p in tmp_path.iterdir() if p.name.startswith("out")]


def test_hosts_mesh_keeps_model_within_a_process():
  import dataclasses
  from horse_jax import meshes
  from horse_jax.errors import UserError

  @dataclasses.dataclass(frozen=True)
  class Device:  # what the mesh reads of a device
    id: int
    process_index: int

  mesh = meshes.hosts_mesh([Device(i, i // 4) for i in reversed(range(8))])  # 2 hosts x 4 devices
  assert dict(mesh.shape) == {"data": 2, "model": 4}
  assert [[d.process_index for d in row] for row in mesh.devices] == [[0] * 4, [1] * 4]
  assert [d.id for d in mesh.devices[1]] == [4, 5, 6, 7]
  with pytest.raises(UserError, match="different device counts"):
    meshes.hosts_mesh([Device(0, 0), Device(1, 0), Device(2, 1)])


def test_lost_process_filter_replaces_the_runtime_report_with_one_line():
  import threading
  from horse_jax.cli import lost_process
  report = (b"horse-jax: loading model: 1.0 s\n"
            b"E1206 00:29:08.926569   17708 coordination_service.cc:1549] [1] Use error polling to propagate "
            b"the following error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped "
            b"sending heartbeats):\n1\nThe tasks have crashed.\n"
            b"F1206 00:29:08.930733   17719 client.h:80] Terminating process because the JAX distributed "
            b"service detected fatal errors.\n*** Check failure stack trace: ***\n    @     0x7f2c  f()\n")
  source_r, source_w = os.pipe()
  sink_r, sink_w = os.pipe()
  with os.fdopen(source_r, "rb", buffering=0) as source, os.fdopen(sink_w, "wb") as sink:
    thread = threading.Thread(target=lost_process.run, args=("0", "h:1", source, sink))
    thread.start()
    os.write(source_w, report)
    os.close(source_w)
    thread.join(timeout=30)
  with os.fdopen(sink_r, "rb") as out:
    assert out.read().decode().splitlines() == [
        "horse-jax: loading model: 1.0 s",
        "horse-jax: error: multi-host: lost process 1 (it stopped sending heartbeats); stopping"]
  assert "lost the coordinator (process 0 at h:1)" in lost_process.verdict(
      b"E1 coordination_service_agent.cc:289] Polled an error\nUNAVAILABLE: Socket closed", "1", "h:1")


def test_settings_fingerprint_names_the_first_difference():
  from horse_jax import distributed
  from horse_jax.cli.common import run_fingerprint
  from horse_jax.cli.main import build_parser
  args = lambda *extra: build_parser().parse_args(  # noqa: E731
      ["edit", "--model", "m", "--data", "d", "--method", "horen", "--out", "o", *extra])
  assert run_fingerprint(args("--process-id", "0")) == run_fingerprint(args("--process-id", "1", "--quiet"))
  a, b = run_fingerprint(args("--mesh", "2x4")), run_fingerprint(args("--mesh", "1x8"))
  assert distributed._first_difference(a, b) == "mesh '2x4' there, '1x8' here"  # noqa: SLF001
  distributed.agree(a)  # one process: nothing to agree with
