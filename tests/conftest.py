"""Shared fixtures: tiny random transformers models of every family, saved as safetensors."""

from __future__ import annotations

import os

# Tests run on CPU; 8 simulated devices let sharding tests run (one process, shared 2 cores).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

from tests.tiny_models import FAMILIES, save_tiny_model


@pytest.fixture(scope="session", autouse=True)
def _converted_files_cache(tmp_path_factory):
    """Converted tokenizers go to the session's temp dir, not ``~/.cache`` (subprocesses inherit it)."""
    os.environ["LOCFT_CACHE_DIR"] = str(tmp_path_factory.mktemp("locft-cache"))


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_model_dir(request, tmp_path_factory) -> Path:
    """An HF directory (config, safetensors, tokenizer) for each family's tiny random model."""
    return save_tiny_model(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("llama-only"))


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M through our GGUF loader, on one device (not one copy per simulated
    device: eight on two cores make its slow tests several times slower). Loaded once per session."""
    from convert.embedded import smollm2_gguf_path
    from locft_jax import load_model
    from tests.test_engine import ONE_DEVICE

    return load_model(smollm2_gguf_path(), mesh=ONE_DEVICE)


@pytest.fixture(scope="session")
def smollm2_hf():
    """The same model through transformers' own GGUF loader: the independent reference."""
    import torch
    import transformers

    from convert.embedded import smollm2_gguf_path

    path = smollm2_gguf_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
