"""A run killed mid-way and resumed ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from locft_jax import load_model
from locft_jax.engine import EditConfig, edit
from locft_jax.engine.checkpoint import latest_state
from tests.test_engine import ONE_DEVICE, REQUESTS

CFG = EditConfig(layers=(2,), lr=5e-3, epochs=5, batch_size=4, skip_step_loss=0.0, early_stop_loss=0.0)
NAME = "model.layers.2.mlp.down_proj.weight"

KILLED_RUN = """
import os, signal
from locft_jax import load_model
from locft_jax.engine import EditConfig, edit
from tests.test_engine import REQUESTS

def die_after_epoch_2(entry):
    if entry["epoch"] == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, as a real crash

cfg = EditConfig(**{config!r})
edit(load_model({model!r}), REQUESTS, cfg, checkpoint_dir={ckpt!r}, on_epoch=die_after_epoch_2)
"""


def test_resume_after_kill_matches_uninterrupted_run(tiny_llama_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    config = {k: (tuple(v) if isinstance(v, list) else v) for k, v in CFG.to_dict().items()}
    script = KILLED_RUN.format(config=config, model=str(tiny_llama_dir), ckpt=str(ckpt))
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert latest_state(ckpt).name == "epoch_0002"

    model = load_model(tiny_llama_dir)
    resumed = edit(model, REQUESTS, CFG, checkpoint_dir=ckpt, resume=True, mesh=ONE_DEVICE)
    assert [e["epoch"] for e in resumed.log] == [0, 1, 2, 3, 4]
    straight = edit(model, REQUESTS, CFG, mesh=ONE_DEVICE)
    np.testing.assert_allclose(np.asarray(resumed.trainable[NAME]), np.asarray(straight.trainable[NAME]), atol=1e-6)


def test_resume_refuses_a_checkpoint_from_a_different_run(tiny_llama_dir, tmp_path):
    model = load_model(tiny_llama_dir)
    edit(model, REQUESTS, CFG.replace(epochs=1), checkpoint_dir=tmp_path, mesh=ONE_DEVICE)
    with pytest.raises(ValueError, match="different run"):
        edit(model, REQUESTS[:5], CFG, checkpoint_dir=tmp_path, resume=True, mesh=ONE_DEVICE)


def test_resume_refuses_other_tensors_or_another_base_model_with_the_clear_error(tiny_llama_dir, tmp_path):
    """Another module or layer set (other tensors, other Adam state) is refused by the fingerprint, not by an
    orbax tree mismatch; another base model of the same shapes is refused too (its edit would be the first
    model's tensor merged into the second)."""
    from tests.tiny_models import save_tiny_model

    model = load_model(tiny_llama_dir)
    edit(model, REQUESTS, CFG.replace(epochs=1), checkpoint_dir=tmp_path / "ckpt", mesh=ONE_DEVICE)
    for change in (dict(module="mlp_up"), dict(layers=(1, 2))):
        with pytest.raises(ValueError, match="checkpoint is from a different run"):
            edit(model, REQUESTS, CFG.replace(epochs=1, **change), checkpoint_dir=tmp_path / "ckpt", resume=True,
                 mesh=ONE_DEVICE)
    other = load_model(save_tiny_model("llama", tmp_path / "other", seed=1))
    with pytest.raises(ValueError, match="checkpoint is from a different run"):
        edit(other, REQUESTS, CFG.replace(epochs=1), checkpoint_dir=tmp_path / "ckpt", resume=True, mesh=ONE_DEVICE)


def test_resuming_an_early_stopped_run_does_not_train_it_further(tiny_llama_dir, tmp_path):
    model = load_model(tiny_llama_dir)
    cfg = CFG.replace(early_stop_loss=1e9)  # stops after epoch 0 of 5
    done = edit(model, REQUESTS, cfg, checkpoint_dir=tmp_path, mesh=ONE_DEVICE)
    again = edit(model, REQUESTS, cfg, checkpoint_dir=tmp_path, resume=True, mesh=ONE_DEVICE)
    assert [e["epoch"] for e in again.log] == [e["epoch"] for e in done.log] == [0]
    np.testing.assert_array_equal(np.asarray(again.trainable[NAME]), np.asarray(done.trainable[NAME]))


def test_a_killed_depth_first_run_resumes_after_its_last_finished_request(tiny_llama_dir, tmp_path):
    """Depth-first checkpoints after each request (its "epoch"): a resumed run trains the rest, each with a
    fresh optimizer and its own norm bound, and ends where an uninterrupted run does."""
    ckpt = tmp_path / "ckpt"
    cfg = CFG.replace(pipeline="df", epochs=3, norm_constraint=1e-3)
    config = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.to_dict().items()}
    script = KILLED_RUN.format(config=config, model=str(tiny_llama_dir), ckpt=str(ckpt))
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert latest_state(ckpt).name == "epoch_0002"  # requests 0-2 done

    model = load_model(tiny_llama_dir)
    log = tmp_path / "log.jsonl"
    resumed = edit(model, REQUESTS, cfg, checkpoint_dir=ckpt, resume=True, mesh=ONE_DEVICE, log_path=log)
    assert [e["epoch"] for e in resumed.log] == list(range(len(REQUESTS)))
    assert all(e["steps"] <= cfg.epochs for e in resumed.log)
    assert len(log.read_text().splitlines()) == len(REQUESTS)
    straight = edit(model, REQUESTS, cfg, mesh=ONE_DEVICE)
    np.testing.assert_allclose(np.asarray(resumed.trainable[NAME]), np.asarray(straight.trainable[NAME]), atol=1e-6)
