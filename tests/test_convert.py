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


# ----------------------------------------------------------------------------- real HF directories


def _copy_model(tiny_dir: Path, dst: Path, tokenizer: bool = True) -> Path:
    dst.mkdir(parents=True)
    for path in tiny_dir.iterdir():
        if tokenizer or not path.name.startswith(("tokenizer", "special_tokens")):
            shutil.copyfile(path, dst / path.name)
    return dst


def _rewrite_tensors(path: Path, change) -> None:
    """Replace the tensors of the safetensors file ``path`` with ``change(tensors)``."""
    from safetensors.numpy import save_file

    save_file(change(load_file(path)), path, metadata={"format": "pt"})


def _assert_same_params(got, want) -> None:
    got, want = flatten(got.params), flatten(want.params)
    assert sorted(got) == sorted(want)
    for name in want:
        assert same_bits(np.asarray(got[name]), np.asarray(want[name])), name


def test_float16_llama2_with_rotary_buffers_loads_and_exports_as_float16(tiny_llama_dir, tmp_path):
    """Old Llama 2 / Vicuna safetensors: float16 weights plus float32 ``rotary_emb.inv_freq`` buffers.
    They load (buffers ignored), and to_hf's default dtype is the weights' float16, not the buffers'."""
    src = _copy_model(tiny_llama_dir, tmp_path / "llama2")
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]

    def old_style(tensors):
        out = {name: value.astype(np.float16) for name, value in tensors.items()}
        for i in range(layers):
            out[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
        return out

    _rewrite_tensors(src / "model.safetensors", old_style)
    ours = load_model(src)
    assert ours.params["model"]["norm"]["weight"].dtype == jnp.float32
    assert run_cli(to_hf_main, [str(src), str(tmp_path / "export")]) == 0
    exported = HFTensors(tmp_path / "export")
    assert {str(exported.dtype(name)) for name in exported.names()} == {"float16"}
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" not in exported.names()


@pytest.mark.parametrize("lm_head", ["equal", "different"])
def test_tied_checkpoint_that_stores_lm_head(lm_head, tmp_path):
    """Llama 3.2 1B / Qwen2.5-0.5B style (tied): an ``lm_head.weight`` in the file too is accepted
    when it equals the embedding, refused otherwise."""
    from tests.tiny_models import save_tiny_model

    src = save_tiny_model("llama3-tied", tmp_path / "tied")
    reference = load_model(src)

    def with_head(tensors):
        head = tensors["model.embed_tokens.weight"].copy()
        head[0, 0] += lm_head == "different"
        return {**tensors, "lm_head.weight": head}

    _rewrite_tensors(src / "model.safetensors", with_head)
    if lm_head == "equal":
        _assert_same_params(load_model(src), reference)
    else:
        with pytest.raises(CheckpointError, match="lm_head.weight differs from embed_tokens"):
            load_model(src)


def test_stale_index_next_to_model_safetensors_loads_like_transformers(tiny_llama_dir, tmp_path):
    """save_pretrained sharded, then unsharded into the same directory: the shards are deleted but the
    index stays. transformers reads ``model.safetensors`` first; so must we."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    src = tmp_path / "resaved"
    model.save_pretrained(src, max_shard_size="50KB")
    assert (src / INDEX_NAME).is_file()
    model.save_pretrained(src)
    assert (src / INDEX_NAME).is_file() and (src / "model.safetensors").is_file()
    transformers.AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(src)
    load_hf(src)
    _assert_same_params(load_model(src), load_model(tiny_llama_dir))


@pytest.fixture
def sharded_copy(tiny_llama_dir, tmp_path) -> Path:
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    return tmp_path / "sharded"


def test_index_listing_a_missing_shard_is_a_clear_error(sharded_copy):
    shard = sorted(sharded_copy.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard}: file not found.*listed in .*{INDEX_NAME}"):
        HFTensors(sharded_copy)


def test_index_naming_a_tensor_absent_from_its_shard_is_a_clear_error(sharded_copy):
    index = json.loads((sharded_copy / INDEX_NAME).read_text())
    name, file = next(iter(index["weight_map"].items()))
    _rewrite_tensors(sharded_copy / file, lambda tensors: {k: v for k, v in tensors.items() if k != name})
    with pytest.raises(CheckpointError, match=f"{INDEX_NAME}.*{name}.*{file}.*does not contain it"):
        HFTensors(sharded_copy)


def test_bin_only_checkpoint_is_a_clear_error(tiny_llama_dir, tmp_path):
    src = _copy_model(tiny_llama_dir, tmp_path / "bin")
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"not read")
    proc = run_module("convert.from_hf", src, tmp_path / "out")
    assert proc.returncode == 2 and "only pickle .bin weights" in proc.stderr, proc.stderr


@pytest.mark.parametrize("kind", ["no config", "config not an object", "extras"])
def test_config_json_is_required_and_other_files_are_ignored(kind, tiny_llama_dir, tmp_path):
    src = _copy_model(tiny_llama_dir, tmp_path / "model")
    if kind == "extras":  # what a hub download also holds: none of it is read
        (src / "README.md").write_text("# model card")
        (src / "original").mkdir()
        (src / "original" / "consolidated.00.pth").write_bytes(b"pickle")
        (src / "generation_config.json").unlink()
        _assert_same_params(load_model(src), load_model(tiny_llama_dir))
        return
    if kind == "no config":
        (src / "config.json").unlink()
        expected = "config.json: file not found"
    else:
        (src / "config.json").write_text("[]")
        expected = "config.json: not a model config"
    with pytest.raises(CheckpointError, match=expected):
        load_model(src)


@pytest.mark.parametrize("kind", ["F8_E4M3", "I8", "quantization_config"])
def test_quantized_weights_are_a_clear_error(kind, tiny_llama_dir, tmp_path):
    """FP8 / int8 / GPTQ-style checkpoints: refused with a message naming the cause, never cast."""
    src = _copy_model(tiny_llama_dir, tmp_path / "quantized")
    weights = src / "model.safetensors"
    name = "model.layers.0.mlp.up_proj.weight"
    if kind == "F8_E4M3":
        _rewrite_header(weights, lambda h: {**h, name: {**h[name], "dtype": "F8_E4M3"}})
        expected = f"{name}.*unsupported dtype 'F8_E4M3'"
    elif kind == "I8":
        _rewrite_tensors(weights, lambda t: {**t, name: t[name].astype(np.int8)})
        expected = f"{name}.*int8.*floating-point"
    else:
        config = json.loads((src / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
        (src / "config.json").write_text(json.dumps(config))
        expected = "quantized.*'gptq'"
    with pytest.raises(CheckpointError, match=expected):
        load_model(src)


def test_missing_tokenizer_is_a_clear_error_before_the_weights_are_read(tiny_llama_dir, tmp_path, monkeypatch):
    src = _copy_model(tiny_llama_dir, tmp_path / "no-tokenizer", tokenizer=False)
    (src / "generation_config.json").unlink()  # optional: its absence is fine

    def no_weights(*args, **kwargs):
        raise AssertionError("weights read before the tokenizer was found")

    monkeypatch.setattr(HFTensors, "read", no_weights)
    with pytest.raises(CheckpointError, match=f"{src}: .*tokenizer"):
        load_model(src)
    with pytest.raises(CheckpointError, match=f"{src}: .*tokenizer"):
        convert_to_orbax(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _fake_hub_cache(cache: Path, repo_id: str, model_dir: Path) -> None:
    """``model_dir`` as the hub cache holds a downloaded repo: blobs, a snapshot of symlinks, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    for i, path in enumerate(sorted(model_dir.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))


def test_hub_name_loads_from_the_local_cache_or_fails_clearly_and_quickly(tiny_llama_dir, tmp_path, monkeypatch):
    import time

    import huggingface_hub

    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "someone/tiny-llama", tiny_llama_dir)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # for the CLI's subprocess
    monkeypatch.chdir(tmp_path)
    _assert_same_params(load_model("someone/tiny-llama"), load_model(tiny_llama_dir))

    start = time.monotonic()
    with pytest.raises(CheckpointError, match="meta-llama/Llama-3.1-8B.*not in the local Hugging Face cache.*download"):
        load_model("meta-llama/Llama-3.1-8B")
    assert time.monotonic() - start < 5
    proc = run_module("convert.from_hf", "meta-llama/Llama-3.1-8B", tmp_path / "out")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "download" in proc.stderr, proc.stderr


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
