"""Conversion round trips on tiny models: HF → ours → HF is bit-exact and loads in transformers;
from_hf (orbax) → load_model is bit-exact; patches equal full exports; CLI errors are clean."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from convert.atomic import atomic_output_dir
from convert.cli import run_cli
from convert.errors import CheckpointError
from convert.from_hf import convert_to_orbax, save_checkpoint
from convert.hf_reader import INDEX_NAME, HFTensors
from convert.patch import PATCH_JSON, PATCH_WEIGHTS, apply_patch, same_bits
from convert.sources import open_checkpoint
from convert.to_hf import export_hf
from convert.to_hf import main as to_hf_main
from locft_jax import load_model
from locft_jax.params import flatten
from locft_jax.sharding import TENSOR_PARALLEL_RULES, make_mesh

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of France is", "Hi there"]
EDITED = "model.layers.1.mlp.down_proj.weight"


def hf_tensors(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of an HF directory, read with the safetensors library itself."""
    out: dict[str, np.ndarray] = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def assert_same_tensors(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert same_bits(got[name], want[name]), name


def load_hf(directory: Path) -> transformers.PreTrainedModel:
    """Load with transformers and insist that no weight was missing, unexpected or mismatched."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, output_loading_info=True
    )
    assert all(not value for value in info.values()), info
    return model.eval()


def hf_logits(model: transformers.PreTrainedModel, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def edited(params: dict) -> dict:
    """The params with one tensor changed, as an edit would."""
    params = jax.tree.map(lambda x: x, params)  # a new tree, same arrays
    down = params["model"]["layers"][1]["mlp"]["down_proj"]
    down["weight"] = down["weight"] + 1e-3
    return params


def test_export_is_bit_exact_and_loads_in_transformers(tiny_model_dir, tmp_path):
    ours = load_model(tiny_model_dir)
    out = export_hf(ours.params, ours.config, ours.tokenizer, tmp_path / "export")
    assert_same_tensors(hf_tensors(out), hf_tensors(tiny_model_dir))
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] == ours.config.tie_word_embeddings

    ids = ours.tokenizer(PROMPTS[:1], return_tensors="np")["input_ids"]
    want = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), ids)
    np.testing.assert_allclose(hf_logits(load_hf(out), ids), want, atol=1e-5, rtol=0)
    assert ours.tokenizer(PROMPTS)["input_ids"] == transformers.AutoTokenizer.from_pretrained(out)(PROMPTS)["input_ids"]


def test_export_gathers_params_sharded_over_devices(tiny_llama_dir, tmp_path):
    mesh = make_mesh(model_parallel=2)
    ours = load_model(tiny_llama_dir, mesh=mesh, rules=TENSOR_PARALLEL_RULES)
    gate = ours.params["model"]["layers"][0]["mlp"]["gate_proj"]["weight"]
    assert not gate.sharding.is_fully_replicated, "the test needs a really sharded param"
    out = export_hf(ours.params, ours.config, ours.tokenizer, tmp_path / "export")
    assert_same_tensors(hf_tensors(out), hf_tensors(tiny_llama_dir))


def test_from_hf_orbax_roundtrip_is_bit_exact(tiny_model_dir, tmp_path):
    out = convert_to_orbax(tiny_model_dir, tmp_path / "ours")
    assert (out / "locft.json").is_file() and (out / "orbax").is_dir()
    assert (out / "generation_config.json").is_file()
    direct, restored = load_model(tiny_model_dir), load_model(out)
    assert restored.config == direct.config
    want, got = flatten(direct.params), flatten(restored.params)
    assert sorted(got) == sorted(want)
    for name in want:
        assert same_bits(np.asarray(got[name]), np.asarray(want[name])), name


def test_bfloat16_roundtrip_through_cli(tiny_llama_dir, tmp_path):
    ours, out = tmp_path / "ours", tmp_path / "export"
    run_module("convert.from_hf", tiny_llama_dir, ours, "--dtype", "bfloat16", check=True)
    assert load_model(ours, dtype=jnp.bfloat16).params["model"]["norm"]["weight"].dtype == jnp.bfloat16
    run_module("convert.to_hf", ours, out, check=True)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "generation_config.json").is_file()
    exported, source = HFTensors(out), HFTensors(tiny_llama_dir)
    for name in source.names():
        assert exported.dtype(name) == np.dtype(jnp.bfloat16)
        assert same_bits(exported.read(name), source.read(name).astype(jnp.bfloat16)), name
    load_hf(out)


def test_export_casts_to_the_requested_dtype(tiny_llama_dir, tmp_path):
    ours = load_model(tiny_llama_dir)
    out = export_hf(ours.params, ours.config, ours.tokenizer, tmp_path / "export", dtype=jnp.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    exported = HFTensors(out)
    for name, value in flatten(ours.params).items():
        assert same_bits(exported.read(name), np.asarray(value).astype(jnp.bfloat16)), name


def test_sharded_export_roundtrips_and_loads(tiny_model_dir, tmp_path):
    ours = load_model(tiny_model_dir)
    out = export_hf(ours.params, ours.config, ours.tokenizer, tmp_path / "export", max_shard_bytes=40_000)
    index = json.loads((out / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (out / "model.safetensors").exists()
    assert_same_tensors(hf_tensors(out), hf_tensors(tiny_model_dir))
    reloaded = load_model(out)
    for name, value in flatten(ours.params).items():
        assert same_bits(np.asarray(flatten(reloaded.params)[name]), np.asarray(value)), name
    load_hf(out)


@pytest.fixture
def sharded_base(tiny_llama_dir, tmp_path) -> Path:
    """The tiny llama as a sharded HF directory (what a big model looks like)."""
    ours = load_model(tiny_llama_dir)
    shutil.copyfile(tiny_llama_dir / "generation_config.json", tmp_path / "generation_config.json")
    return export_hf(
        ours.params,
        ours.config,
        ours.tokenizer,
        tmp_path / "base",
        max_shard_bytes=40_000,
        generation_config=tmp_path / "generation_config.json",
    )


def test_export_over_base_copies_unchanged_shards(sharded_base, tmp_path):
    ours = load_model(sharded_base)
    params = edited(ours.params)
    fresh = export_hf(params, ours.config, ours.tokenizer, tmp_path / "fresh")
    over = export_hf(params, ours.config, ours.tokenizer, tmp_path / "over", base=sharded_base)
    assert_same_tensors(hf_tensors(over), hf_tensors(fresh))
    edited_file = json.loads((sharded_base / INDEX_NAME).read_text())["weight_map"][EDITED]
    for shard in sorted(sharded_base.glob("*.safetensors")):
        same = filecmp.cmp(shard, over / shard.name, shallow=False)
        assert same == (shard.name != edited_file), shard.name
    assert (over / "generation_config.json").is_file()
    load_hf(over)


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_only_changed_patch_applies_to_the_full_export(layout, tiny_llama_dir, sharded_base, tmp_path):
    base = tiny_llama_dir if layout == "single" else sharded_base
    ours = load_model(base)
    params = edited(ours.params)
    full = export_hf(params, ours.config, ours.tokenizer, tmp_path / "full", base=base)
    patch = export_hf(params, ours.config, None, tmp_path / "patch", base=base, only_changed=True)
    assert sorted(p.name for p in patch.iterdir()) == [PATCH_JSON, PATCH_WEIGHTS]
    assert list(json.loads((patch / PATCH_JSON).read_text())["tensors"]) == [EDITED]
    assert list(load_file(patch / PATCH_WEIGHTS)) == [EDITED]

    applied = apply_patch(base, patch, tmp_path / "applied")
    assert_same_tensors(hf_tensors(applied), hf_tensors(full))
    for shard in full.glob("*.safetensors"):
        assert filecmp.cmp(shard, applied / shard.name, shallow=False), shard.name
    load_hf(applied)


def test_patch_cli_against_a_from_hf_checkpoint(tiny_llama_dir, tmp_path):
    """to_hf --only-changed on an edited checkpoint, then convert.patch apply, via the CLIs."""
    ours = load_model(tiny_llama_dir)
    params = edited(ours.params)
    ckpt = save_checkpoint(params, ours.config, ours.tokenizer, tmp_path / "edited")
    run_module("convert.to_hf", ckpt, tmp_path / "patch", "--base", tiny_llama_dir, "--only-changed", check=True)
    run_module("convert.patch", "apply", tiny_llama_dir, tmp_path / "patch", tmp_path / "applied", check=True)
    full = export_hf(params, ours.config, ours.tokenizer, tmp_path / "full")
    assert_same_tensors(hf_tensors(tmp_path / "applied"), hf_tensors(full))
    assert (tmp_path / "applied" / "tokenizer.json").is_file()


def test_float16_base_is_patched_and_reused_through_the_cli(tiny_llama_dir, tmp_path):
    """A float16 base (Llama 2 ships as one): ``--dtype float16`` gives a patch that applies and an
    export over the base that reuses its unchanged shards, both equal to a float16 full export."""
    base = tmp_path / "base"
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float16)
    model.save_pretrained(base, max_shard_size="50KB")
    transformers.AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(base)
    ours = load_model(base)
    params = edited(ours.params)
    ckpt = save_checkpoint(params, ours.config, ours.tokenizer, tmp_path / "edited")
    patch, over = tmp_path / "patch", tmp_path / "over"
    flags = ["--base", str(base), "--dtype", "float16"]
    assert run_cli(to_hf_main, [str(ckpt), str(patch), "--only-changed", *flags]) == 0
    assert run_cli(to_hf_main, [str(ckpt), str(over), *flags]) == 0
    applied = apply_patch(base, patch, tmp_path / "applied")
    full = export_hf(params, ours.config, ours.tokenizer, tmp_path / "full", dtype=jnp.float16)
    assert_same_tensors(hf_tensors(applied), hf_tensors(full))
    assert_same_tensors(hf_tensors(over), hf_tensors(full))
    edited_file = json.loads((base / INDEX_NAME).read_text())["weight_map"][EDITED]
    for shard in sorted(base.glob("*.safetensors")):
        assert filecmp.cmp(shard, over / shard.name, shallow=False) == (shard.name != edited_file), shard.name
    load_hf(applied)


def test_unedited_params_give_an_empty_patch_against_an_orbax_base(tiny_llama_dir, tmp_path):
    base = convert_to_orbax(tiny_llama_dir, tmp_path / "ours")
    ours = load_model(base)
    patch = export_hf(ours.params, ours.config, None, tmp_path / "patch", base=base, only_changed=True)
    assert json.loads((patch / PATCH_JSON).read_text())["tensors"] == {}


# ----------------------------------------------------------------------------- CLI errors


def run_module(module: str, *args: object, check: bool = False) -> subprocess.CompletedProcess:
    # One CPU device: the CLI needs no simulated mesh, and it keeps the subprocess light.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _broken_source(kind: str, tiny_llama_dir: Path, tmp_path: Path) -> tuple[Path, str]:
    """A bad source checkpoint and the text its error line must contain."""
    src = tmp_path / "src"
    if kind == "missing":
        return src, str(src)
    shutil.copytree(tiny_llama_dir, src)
    config_path, weights = src / "config.json", src / "model.safetensors"
    config = json.loads(config_path.read_text())
    if kind == "model_type":
        config_path.write_text(json.dumps({**config, "model_type": "gpt2"}))
        return src, f"{config_path}: unsupported model_type 'gpt2'"
    if kind == "shape":
        config_path.write_text(json.dumps({**config, "intermediate_size": 100}))
        return src, "'model.layers.0.mlp.gate_proj.weight' has shape (96, 64), config expects (100, 64)"
    with open(weights, "r+b") as f:  # truncated
        f.truncate(weights.stat().st_size // 2)
    return src, f"{weights}: truncated"


@pytest.mark.parametrize("kind", ["missing", "model_type", "shape", "truncated"])
@pytest.mark.parametrize("module", ["convert.from_hf", "convert.to_hf"])
def test_cli_errors_are_one_clear_line_and_leave_no_output(module, kind, tiny_llama_dir, tmp_path):
    src, expected = _broken_source(kind, tiny_llama_dir, tmp_path)
    out = tmp_path / "out"
    proc = run_module(module, src, out)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert expected in proc.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temp dir left behind"


def test_cli_refuses_a_non_empty_output(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run_cli(to_hf_main, [str(tiny_llama_dir), str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_apply_patch_rejects_a_dtype_mismatch(tiny_llama_dir, tmp_path):
    ours = load_model(tiny_llama_dir, dtype=jnp.bfloat16)
    patch = export_hf(
        edited(ours.params), ours.config, None, tmp_path / "patch", base=tiny_llama_dir, only_changed=True
    )
    with pytest.raises(CheckpointError, match=f"{EDITED}.*export the patch with the base's --dtype"):
        apply_patch(tiny_llama_dir, patch, tmp_path / "applied")
    assert not (tmp_path / "applied").exists()


def _rewrite_header(path: Path, change) -> None:
    """Replace the JSON header of the safetensors file ``path`` with ``change(header)``, data kept."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    blob = json.dumps(change(json.loads(raw[8 : 8 + length]))).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + length :])


_CORRUPT_HEADERS = {
    "shape": lambda h: {**h, "w": {**h["w"], "shape": [3, 3]}},  # 9 floats in 6 floats' bytes
    "offsets": lambda h: {**h, "w": {**h["w"], "data_offsets": h["w"]["data_offsets"][::-1]}},
    "no offsets": lambda h: {**h, "w": {"dtype": "F32", "shape": [2, 3]}},
    "not an object": lambda h: [h],
}


@pytest.mark.parametrize("kind", list(_CORRUPT_HEADERS))
def test_corrupt_safetensors_header_is_a_clear_error(kind, tmp_path):
    from convert.safetensors_io import SafetensorsFile, write_safetensors

    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"w": np.zeros((2, 3), np.float32), "b": np.ones(3, np.float32)})
    _rewrite_header(path, _CORRUPT_HEADERS[kind])
    with pytest.raises(CheckpointError, match=f"{path}: .*corrupt"):
        f = SafetensorsFile(path)
        for name in f.names():
            f.read(name)


def test_open_checkpoint_recognises_each_format(tiny_llama_dir, tmp_path):
    ours = convert_to_orbax(tiny_llama_dir, tmp_path / "ours")
    assert type(open_checkpoint(ours).tensors).__name__ == "OrbaxTensors"
    assert type(open_checkpoint(tiny_llama_dir).tensors).__name__ == "HFTensors"


# ----------------------------------------------------------------------------- atomic output


def test_atomic_dir_appears_only_on_success(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_output_dir(out) as tmp:
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []
    with atomic_output_dir(out) as tmp:
        (tmp / "whole.txt").write_text("x")
    assert [p.name for p in out.iterdir()] == ["whole.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_overwrite_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(CheckpointError, match="not empty"), atomic_output_dir(out):
        pass
    with pytest.raises(RuntimeError), atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_writes_through_a_symlinked_output(tmp_path):
    """OUT a symlink to a directory (e.g. on a scratch disk): the target gets the new contents."""
    target, out = tmp_path / "scratch" / "model", tmp_path / "out"
    target.mkdir(parents=True)
    out.symlink_to(target)
    with atomic_output_dir(out) as tmp:  # an empty target: no --overwrite needed
        (tmp / "first.txt").write_text("1")
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "second.txt").write_text("2")
    assert out.is_symlink() and out.resolve() == target.resolve()
    assert [p.name for p in target.iterdir()] == ["second.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "scratch"]
    assert [p.name for p in target.parent.iterdir()] == ["model"]


# ----------------------------------------------------------------------------- GGUF → HF


@pytest.fixture(scope="module")
def smollm2_export(smollm2, tmp_path_factory):
    m = smollm2
    return m, export_hf(m.params, m.config, m.tokenizer, tmp_path_factory.mktemp("smollm2") / "hf")


@pytest.mark.slow
def test_gguf_export_loads_in_transformers_and_matches_our_logits(smollm2_export):
    from convert.embedded import smollm2_gguf_path

    ours, out = smollm2_export
    assert not (out / "lm_head.weight").exists()
    assert "lm_head.weight" not in HFTensors(out).names()
    path = smollm2_gguf_path()
    want_config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_dict()
    got_config = transformers.AutoConfig.from_pretrained(out).to_dict()
    for key in (
        "vocab_size",
        "hidden_size",
        "num_key_value_heads",
        "rms_norm_eps",
        "rope_parameters",
        "tie_word_embeddings",
        "max_position_embeddings",
        "head_dim",
        "bos_token_id",
        "eos_token_id",
    ):
        assert got_config[key] == want_config[key], key

    hf = load_hf(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    for prompt in PROMPTS:
        ids = tokenizer([prompt], return_tensors="np")["input_ids"]
        np.testing.assert_allclose(hf_logits(hf, ids), np.asarray(ours.logits(ids)), atol=1e-3, rtol=0)
