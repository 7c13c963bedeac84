"""A multi-host run: two processes with four CPU devices each, joined by ``jax.distributed``, edit as one."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from locft_jax import load_model
from locft_jax.data import load_requests
from locft_jax.engine import EditConfig, edit
from locft_jax.params import flatten
from tests.test_engine import ONE_DEVICE

ROOT = Path(__file__).parents[1]
DATA = ROOT / "experiments" / "data" / "country_capitals.json"
NAME = "model.layers.2.mlp.down_proj.weight"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_processes(argv: list[str], processes: int = 2, devices_each: int = 4) -> list[subprocess.CompletedProcess]:
    """``python -m experiments.run *argv`` as one multi-host run of ``processes`` local processes."""
    port = _free_port()
    base = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
            "LOCFT_COMPILE_CACHE": "", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_each}",
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(processes)}
    running = [
        subprocess.Popen([sys.executable, "-m", "experiments.run", *argv], cwd=ROOT, text=True,
                         env={**base, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for i in range(processes)
    ]
    done = []
    for proc in running:
        try:
            out, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for p in running:
                p.kill()
            raise
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


@pytest.mark.slow
def test_two_processes_edit_as_one_run_and_process_0_writes_once(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    # model_parallel=4: each host's 4 devices split the weights, the batch is split over the 2 hosts
    argv = ["edit", "--model", str(tiny_llama_dir), "--data", str(DATA), "--edits", "6", "--layer", "2",
            "--epochs", "3", "--batch-size", "4", "--lr", "1e-3", "--set", "early_stop_loss=0",
            "--set", "skip_step_loss=0", "--set", "model_parallel=4", "--general-facts", "",
            "--out", str(out), "--export-hf"]
    procs = _run_processes(argv)
    for i, proc in enumerate(procs):
        assert proc.returncode == 0, f"process {i}:\n{proc.stderr[-3000:]}"
    assert "run directory" in procs[1].stdout  # every process ran the job to its end

    assert len((out / "log.jsonl").read_text().splitlines()) == 3  # written once, not once per process
    post = json.loads((out / "metrics.json").read_text())["post"]
    # greedy generation too: its slots are split over the 2 hosts' data axis, then gathered
    assert post["teacher_forced/reliability"]["count"] == post["generation/reliability"]["count"] == 6
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["epoch_0001", "epoch_0002"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp dir left behind

    # the same edit in one process on one device
    model = load_model(tiny_llama_dir)
    config = EditConfig.from_dict(json.loads((out / "config.json").read_text())["edit_config"])
    assert config.model_parallel == 4
    single = edit(model, load_requests(DATA, limit=6).requests, config.replace(model_parallel=1), mesh=ONE_DEVICE)
    exported = load_file(out / "hf" / "model.safetensors")
    np.testing.assert_allclose(exported[NAME], np.asarray(single.trainable[NAME]), atol=1e-5)
    assert not np.array_equal(exported[NAME], np.asarray(flatten(model.params)[NAME]))
    other = "model.layers.1.mlp.down_proj.weight"
    np.testing.assert_array_equal(exported[other], np.asarray(flatten(model.params)[other]))

    # as if killed during the last epoch: its checkpoint and log line are gone; every process resumes from epoch 1's
    shutil.rmtree(out / "checkpoints" / "epoch_0002")
    log = (out / "log.jsonl").read_text().splitlines(keepends=True)
    (out / "log.jsonl").write_text("".join(log[:2]))
    procs = _run_processes(argv[: argv.index("--out")] + ["--out", str(out), "--export-hf", "--resume"])
    for i, proc in enumerate(procs):
        assert proc.returncode == 0, f"process {i} (resumed):\n{proc.stderr[-3000:]}"
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [0, 1, 2]
    resumed = load_file(out / "hf" / "model.safetensors")
    np.testing.assert_allclose(resumed[NAME], exported[NAME], atol=1e-6)


def test_a_bad_process_count_is_a_clear_error(tiny_llama_dir, tmp_path, monkeypatch):
    from experiments.run import main

    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    assert main(["edit", "--model", str(tiny_llama_dir), "--data", str(DATA), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("value, joins", [("0", False), ("off", False), ("", False), ("1", True), ("True", True)])
def test_locft_multihost_is_an_on_off_switch(monkeypatch, value, joins):
    from locft_jax import hosts

    calls = []
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.setenv("LOCFT_MULTIHOST", value)
    monkeypatch.setattr(hosts.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    hosts.init_distributed()
    assert calls == ([{}] if joins else [])


def test_a_bad_multihost_switch_is_a_clear_error(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    from experiments.run import main

    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.setenv("LOCFT_MULTIHOST", "maybe")
    assert main(["edit", "--model", str(tiny_llama_dir), "--data", str(DATA), "--out", str(tmp_path / "x")]) == 2
    assert "LOCFT_MULTIHOST='maybe': use 1 (on) or 0 (off)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
