"""The editing engine: exact semantics vs a plain full-model implementation, and its guarantees."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from locft_jax import load_model
from locft_jax import model as M
from locft_jax.engine import EditConfig, LocationError, NonFiniteLossError, edit
from locft_jax.engine.dataset import batches, epoch_order, prepare_dataset
from locft_jax.params import flatten, unflatten
from locft_jax.requests import EditRequest, RequestError
from locft_jax.sharding import make_mesh
from locft_jax.tokens import PromptTarget, encode_prompt, encode_target, pad_target_batch

REQUESTS = [
    EditRequest("The capital of Atlantis is", "Poseidonia"),
    EditRequest("Mount Olympus is located in", "Greece"),
    EditRequest("The Eiffel Tower is in the city of", "Rome"),
    EditRequest("Water boils at", "one hundred degrees"),
    EditRequest("The author of Hamlet is", "Shakespeare"),
    EditRequest("The largest planet is", "Jupiter"),
    EditRequest("Q", "A"),
    EditRequest("A much longer prompt that asks, after a long preamble about nothing, the colour of", "blue"),
    EditRequest("The currency of Japan is the", "yen"),
    EditRequest("Python was created by", "Guido van Rossum"),
]
# One device unless the test is about devices: 8 simulated devices share 2 cores and are slow.
ONE_DEVICE = make_mesh(devices=jax.devices()[:1])
FAST = dict(lr=5e-3, epochs=4, batch_size=4, skip_step_loss=0.0, early_stop_loss=0.0)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(tiny_llama_dir)


def _changed(before, after) -> set[str]:
    a, b = flatten(before), flatten(after)
    return {k for k in a if not np.array_equal(np.asarray(a[k]), np.asarray(b[k]))}


def _plain_reference(model, requests, cfg: EditConfig, names: list[str]) -> dict[str, np.ndarray]:
    """The obvious implementation: every token of prompt + target + EOS, full logits, full-model gradients,
    an optax-masked Adam."""
    pairs = [PromptTarget(encode_prompt(model.tokenizer, r.prompt), encode_target(model.tokenizer, r.target_new))
             for r in requests]
    ds = pad_target_batch(pairs, max(len(p) + len(t) for p, t in pairs), max(len(t) for _, t in pairs))
    flat = flatten(model.params)
    labels = unflatten({k: ("edit" if k in names else "frozen") for k in flat}, model.config)
    tx = optax.partition({"edit": optax.adam(cfg.lr), "frozen": optax.set_to_zero()}, labels)
    params = model.params
    opt_state = tx.init(params)

    def loss_fn(p, rows):
        idx = list(rows)
        logits = M.logits(p, model.config, jnp.asarray(ds.ids[idx]), jnp.asarray(ds.mask[idx]))
        logp = jax.nn.log_softmax(logits, -1)
        total = 0.0
        for r, row in enumerate(rows):
            tm = ds.target_mask[row]
            pos, tgt = ds.target_pos[row][tm], ds.target_ids[row][tm]
            total += -logp[r, pos, tgt].mean()
        return total / len(rows)

    grad_fn = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1)
    for epoch in range(cfg.epochs):
        for rows in batches(epoch_order(len(pairs), cfg.seed, epoch), cfg.batch_size):
            _, grads = grad_fn(params, tuple(int(r) for r in rows))
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
    return {k: np.asarray(flatten(params)[k]) for k in names}


@pytest.mark.parametrize("module", ["mlp_down", "mlp_up", "attn"])
def test_engine_equals_plain_masked_full_model_training(tiny, module):
    cfg = EditConfig(layers=(2,), module=module, **FAST)
    result = edit(tiny, REQUESTS, cfg, mesh=ONE_DEVICE)
    want = _plain_reference(tiny, REQUESTS, cfg, list(result.trainable))
    base = flatten(tiny.params)
    for name, value in want.items():
        got, start = np.asarray(result.trainable[name]), np.asarray(base[name])
        # Float32 sums in another order (packed rows, chunked LM head), through 12 Adam steps: the
        # update agrees to 1e-5 relative; single entries (attention's q/k) to ~1e-5 absolute.
        assert np.linalg.norm((got - start) - (value - start)) <= 2e-5 * np.linalg.norm(value - start), name
        np.testing.assert_allclose(got, value, atol=3e-5, rtol=0, err_msg=name)
    assert _changed(tiny.params, result.params) == set(want)


@pytest.mark.parametrize("module", ["mlp_down", "mlp_up", "mlp", "attn", "layer"])
def test_prefix_cache_gives_the_same_weights_as_the_plain_path(tiny, module):
    cfg = EditConfig(layers=(1, 3), module=module, **FAST)
    cached = edit(tiny, REQUESTS, cfg, mesh=ONE_DEVICE)
    plain = edit(tiny, REQUESTS, cfg.replace(prefix_cache=False), mesh=ONE_DEVICE)
    assert cached.cache_bytes > 0 and plain.cache_bytes == 0
    for name in plain.trainable:
        np.testing.assert_allclose(
            np.asarray(cached.trainable[name]), np.asarray(plain.trainable[name]), atol=1e-5, err_msg=name
        )


def test_prefix_cache_chunks_run_at_their_own_length_and_match_the_plain_path(tiny, monkeypatch):
    from locft_jax.engine import prefix_cache
    from locft_jax.engine.forward import prefix_inputs
    from locft_jax.engine.locations import CachePoint, resolve_location

    monkeypatch.setattr(prefix_cache, "CHUNK_ROWS", 3)  # 4 chunks of different lengths
    ds = prepare_dataset(tiny.tokenizer, REQUESTS)
    location = resolve_location(tiny.config, (2,), "mlp_down")
    got = prefix_cache.compute_prefix(tiny.params, tiny.config, location, CachePoint.DOWN_INPUT, ds)
    full = prefix_inputs(tiny.params, tiny.config, location, CachePoint.DOWN_INPUT, jnp.asarray(ds.ids),
                         jnp.asarray(ds.mask))
    for key in ("h", "act"):
        assert got[key].shape == full[key].shape
        for row, length in enumerate(ds.seq_len):
            np.testing.assert_allclose(got[key][row, :length], np.asarray(full[key][row, :length]), atol=1e-5)
    shortest = int(np.argmin(ds.seq_len))
    assert not got["h"][shortest, ds.seq_len.max():].any()  # its chunk stopped at its own bucket
    split = prefix_cache.compute_prefix(tiny.params, tiny.config, location, CachePoint.DOWN_INPUT, ds, make_mesh())
    for key in ("h", "act"):  # chunks of 8 rows (3 rounded up to the 8 devices), split over them
        for row, length in enumerate(ds.seq_len):
            np.testing.assert_allclose(split[key][row, :length], got[key][row, :length], atol=1e-5)
    # written into device arrays where computed: the same values, replicated, no host copy
    on_device = prefix_cache.compute_prefix(tiny.params, tiny.config, location, CachePoint.DOWN_INPUT, ds, make_mesh(),
                                            on_device=True)
    for key in ("h", "act"):
        assert on_device[key].sharding.is_fully_replicated
        np.testing.assert_array_equal(np.asarray(on_device[key]), split[key])
    with pytest.raises(ValueError, match="needs a mesh"):
        prefix_cache.compute_prefix(tiny.params, tiny.config, location, CachePoint.DOWN_INPUT, ds, on_device=True)
    cfg = EditConfig(layers=(2,), **FAST)
    cached = edit(tiny, REQUESTS, cfg, mesh=ONE_DEVICE)
    plain = edit(tiny, REQUESTS, cfg.replace(prefix_cache=False), mesh=ONE_DEVICE)
    name = "model.layers.2.mlp.down_proj.weight"
    np.testing.assert_allclose(np.asarray(cached.trainable[name]), np.asarray(plain.trainable[name]), atol=1e-5)


@pytest.mark.parametrize("objective", ["ft-m", "ft-l"])
def test_only_tokens_the_loss_reads_run(tiny, objective):
    """ft-m: the final EOS predicts nothing and is dropped; ft-l: only the prompt runs."""
    ds = prepare_dataset(tiny.tokenizer, REQUESTS, objective)
    for row, req in enumerate(REQUESTS):
        prompt, target = encode_prompt(tiny.tokenizer, req.prompt), encode_target(tiny.tokenizer, req.target_new)
        want = prompt + target[:-1] if objective == "ft-m" else prompt
        assert ds.seq_len[row] == len(want) == ds.target_pos[row][ds.target_mask[row]].max() + 1
        assert list(ds.ids[row][ds.mask[row]]) == want and not ds.ids[row][len(want):].any()
        assert list(ds.target_ids[row][ds.target_mask[row]]) == target  # every target token still scored


def test_host_store_equals_device_store(tiny):
    cfg = EditConfig(layers=(2,), **FAST)
    device = edit(tiny, REQUESTS, cfg, mesh=ONE_DEVICE)
    host = edit(tiny, REQUESTS, cfg.replace(prefix_cache_device_bytes=0), mesh=ONE_DEVICE)
    np.testing.assert_allclose(
        np.asarray(host.trainable["model.layers.2.mlp.down_proj.weight"]),
        np.asarray(device.trainable["model.layers.2.mlp.down_proj.weight"]),
        atol=1e-6,
    )


class _FakeDevice:
    def __init__(self, platform: str, stats: dict | None):
        self.platform, self._stats = platform, stats

    def memory_stats(self):
        return self._stats


def test_the_default_device_budget_is_half_the_least_free_accelerator_memory():
    from locft_jax.engine.prefix_cache import CPU_DEVICE_BYTES, device_budget

    gpus = [_FakeDevice("gpu", {"bytes_limit": 80 << 30, "bytes_in_use": 16 << 30}),
            _FakeDevice("gpu", {"bytes_limit": 80 << 30, "bytes_in_use": 20 << 30})]
    assert device_budget(gpus) == 30 << 30  # the store is replicated: the fullest device decides
    assert device_budget(jax.devices("cpu")) == CPU_DEVICE_BYTES
    assert device_budget([_FakeDevice("tpu", None)]) == CPU_DEVICE_BYTES  # no statistics reported


def test_only_the_chosen_tensor_changes_and_the_model_is_untouched(tiny):
    before = jax.tree.map(np.asarray, tiny.params)
    result = edit(tiny, REQUESTS, EditConfig(layers=(-2,), **FAST), mesh=ONE_DEVICE)
    assert _changed(tiny.params, result.params) == {"model.layers.2.mlp.down_proj.weight"}
    assert not _changed(before, tiny.params)


def test_compiles_once_per_shape_never_once_per_short_batch(tiny):
    same_bucket = [EditRequest(f"Fact number {i} is", f"value {i}") for i in range(10)]  # batches 4, 4, 2
    cfg = EditConfig(layers=(2,), **{**FAST, "lr": 1.234e-3, "packing": False})  # a setting no other test compiled
    assert edit(tiny, same_bucket, cfg, mesh=ONE_DEVICE).compiles == 1
    assert edit(tiny, same_bucket[::-1], cfg, mesh=ONE_DEVICE).compiles == 0  # a second call reuses it
    # packed, the short last batch has one smaller shape of its own: one more compile, not one per epoch
    packed = cfg.replace(packing=True, epochs=6)
    assert edit(tiny, same_bucket, packed, mesh=ONE_DEVICE).compiles == 2
    assert edit(tiny, same_bucket[::-1], packed, mesh=ONE_DEVICE).compiles == 0


def test_same_seed_gives_bit_identical_weights(tiny):
    cfg = EditConfig(layers=(2,), **FAST)
    a, b = edit(tiny, REQUESTS, cfg, mesh=ONE_DEVICE), edit(tiny, REQUESTS, cfg, mesh=ONE_DEVICE)
    assert np.array_equal(np.asarray(a.trainable["model.layers.2.mlp.down_proj.weight"]),
                          np.asarray(b.trainable["model.layers.2.mlp.down_proj.weight"]))


def test_one_device_and_eight_devices_agree(tiny):
    assert len(jax.devices()) == 8, "tests run with 8 simulated CPU devices"
    cfg = EditConfig(layers=(2,), **{**FAST, "batch_size": 8})
    one = edit(tiny, REQUESTS, cfg, mesh=ONE_DEVICE)
    eight = edit(tiny, REQUESTS, cfg, mesh=make_mesh())
    sharded = edit(tiny, REQUESTS, cfg.replace(model_parallel=4))  # 2-way data × 4-way tensor parallel
    name = "model.layers.2.mlp.down_proj.weight"
    assert len(sharded.trainable[name].sharding.device_set) == 8
    assert sharded.trainable[name].sharding.spec[0] is None  # [embed, mlp]: mlp dim split, embed not
    for other in (eight, sharded):
        np.testing.assert_allclose(np.asarray(one.trainable[name]), np.asarray(other.trainable[name]), atol=1e-5)


def test_skip_step_and_early_stop_thresholds(tiny):
    skipped = edit(tiny, REQUESTS, EditConfig(layers=(2,), **{**FAST, "skip_step_loss": 1e9}), mesh=ONE_DEVICE)
    assert all(e["steps_skipped"] == e["steps"] for e in skipped.log)
    assert not _changed(tiny.params, skipped.params)
    stopped = edit(tiny, REQUESTS, EditConfig(layers=(2,), **{**FAST, "early_stop_loss": 1e9}), mesh=ONE_DEVICE)
    assert len(stopped.log) == 1


def test_norm_constraint_bounds_the_change(tiny):
    eps = 1e-4
    result = edit(tiny, REQUESTS, EditConfig(layers=(2,), norm_constraint=eps, **FAST), mesh=ONE_DEVICE)
    name = "model.layers.2.mlp.down_proj.weight"
    delta = np.abs(np.asarray(result.trainable[name]) - np.asarray(flatten(tiny.params)[name]))
    assert 0 < delta.max() <= eps + 1e-7


def test_depth_first_norm_constraint_bounds_each_request_from_its_own_start(tiny):
    """EasyEdit's sequential FT clamps each request's change around the weights that request started
    from (``weights_copy`` is taken per ``execute_ft`` call), so the run's total change may pass eps."""
    eps, name = 1e-4, "model.layers.2.mlp.down_proj.weight"
    cfg = EditConfig(layers=(2,), pipeline="df", norm_constraint=eps, **{**FAST, "lr": 1e-2, "epochs": 3})
    one = np.asarray(edit(tiny, REQUESTS[:1], cfg, mesh=ONE_DEVICE).trainable[name])
    two = np.asarray(edit(tiny, REQUESTS[:2], cfg, mesh=ONE_DEVICE).trainable[name])
    w0 = np.asarray(flatten(tiny.params)[name])
    assert 0 < np.abs(one - w0).max() <= eps + 1e-7  # the first request: within eps of the model
    assert 0 < np.abs(two - one).max() <= eps + 1e-7  # the second: within eps of where it started
    assert np.abs(two - w0).max() > 1.5 * eps  # not clamped around the run's start


@pytest.mark.parametrize("pipeline,objective", [("bf", "ft-l"), ("df", "ft-m")])
def test_other_pipelines_and_objectives_reduce_the_loss(tiny, pipeline, objective):
    cfg = EditConfig(layers=(2,), pipeline=pipeline, objective=objective, **{**FAST, "lr": 1e-2, "epochs": 6})
    result = edit(tiny, REQUESTS[:4], cfg, mesh=ONE_DEVICE)
    if pipeline == "bf":
        assert result.log[-1]["loss"] < result.log[0]["loss"]
    else:
        assert len(result.log) == 4  # one entry per request, each trained to convergence in turn


def test_bf16_model_trains_a_float32_master_copy(tiny_llama_dir):
    model = load_model(tiny_llama_dir, dtype=jnp.bfloat16)
    result = edit(model, REQUESTS, EditConfig(layers=(2,), **FAST), mesh=ONE_DEVICE)
    assert result.trainable["model.layers.2.mlp.down_proj.weight"].dtype == jnp.float32
    assert result.params["model"]["layers"][2]["mlp"]["down_proj"]["weight"].dtype == jnp.bfloat16


def test_bad_requests_are_named_or_skipped(tiny):
    bad = [*REQUESTS[:2], EditRequest("Prompt", "  "), REQUESTS[0]]
    with pytest.raises(RequestError, match="record 2: field 'target_new'"):
        edit(tiny, bad, EditConfig(layers=(2,), **FAST), mesh=ONE_DEVICE)
    result = edit(tiny, bad, EditConfig(layers=(2,), on_bad_record="skip", **FAST), mesh=ONE_DEVICE)
    assert [i for i, _ in result.skipped_records] == [2, 3]
    assert "duplicate of record 0" in result.skipped_records[1][1]
    with pytest.raises(RequestError, match="record 0: prompt \\+ target is .* max_length is 8"):
        edit(tiny, REQUESTS[:1], EditConfig(layers=(2,), max_length=8, **FAST), mesh=ONE_DEVICE)


def test_a_target_differing_only_by_its_leading_space_is_a_duplicate(tiny):
    """``encode_target`` strips leading whitespace: "World" and " World" are the same training row."""
    same = [EditRequest("Hello", "World"), EditRequest("Hello", " World")]
    with pytest.raises(RequestError, match="record 1: duplicate of record 0"):
        prepare_dataset(tiny.tokenizer, same)
    assert [i for i, _ in prepare_dataset(tiny.tokenizer, same, on_bad_record="skip").skipped] == [1]


def test_skipped_retain_records_are_counted_and_named(tiny):
    keep = [EditRequest("The sky is", "blue"), EditRequest("The sky is", "blue"), EditRequest("Q", "B")]
    ds = prepare_dataset(tiny.tokenizer, REQUESTS, on_bad_record="skip", retain=keep)
    assert ds.skipped == [] and len(ds) == len(REQUESTS) + 1
    assert [i for i, _ in ds.skipped_retain] == [1, 2]
    assert "retain record 1: duplicate of retain record 0" in ds.skipped_retain[0][1]
    assert "retain record 2: prompt 'Q' is also edited" in ds.skipped_retain[1][1]
    result = edit(tiny, REQUESTS, EditConfig(layers=(2,), on_bad_record="skip", **{**FAST, "epochs": 1}),
                  retain=keep, mesh=ONE_DEVICE)
    assert result.skipped_records == [] and result.skipped_retain == ds.skipped_retain


def test_unknown_layer_or_module_lists_the_valid_choices(tiny):
    with pytest.raises(LocationError, match="valid: layer, attn, mlp, mlp_down, mlp_up"):
        edit(tiny, REQUESTS, EditConfig(module="ffn"), mesh=ONE_DEVICE)
    with pytest.raises(LocationError, match="valid: 0..3"):
        edit(tiny, REQUESTS, EditConfig(layers=(7,)), mesh=ONE_DEVICE)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("lr", float("inf"), "EditConfig.lr must be a finite number > 0, got inf"),
        ("lr", float("nan"), "EditConfig.lr must be a finite number > 0, got nan"),
        ("grad_clip", float("nan"), "EditConfig.grad_clip must be a finite number >= 0 (0 = off), got nan"),
        ("grad_clip", -1.0, "EditConfig.grad_clip must be a finite number >= 0 (0 = off), got -1.0"),
        ("norm_constraint", -0.1, "EditConfig.norm_constraint must be a finite number >= 0"),
        ("skip_step_loss", -1.0, "EditConfig.skip_step_loss must be a finite number >= 0"),
        ("early_stop_loss", -1e-2, "EditConfig.early_stop_loss must be a finite number >= 0"),
        ("null_space_tol", -1e-3, "EditConfig.null_space_tol must be a finite number >= 0"),
        ("retain_weight", -1.0, "EditConfig.retain_weight must be a finite number >= 0"),
        ("early_stop_reliability", 1.5, "EditConfig.early_stop_reliability must be between 0 and 1"),
        ("early_stop_reliability", -0.5, "EditConfig.early_stop_reliability must be between 0 and 1"),
        ("seed", -1, "EditConfig.seed must be >= 0, got -1"),
        ("warmup_steps", -3, "EditConfig.warmup_steps must be >= 0, got -3"),
        ("prefix_cache_device_bytes", -5, "EditConfig.prefix_cache_device_bytes must be >= 0 or None, got -5"),
    ],
)
def test_out_of_range_config_values_are_named(field, value, message):
    """Caught when the config is made, not met mid-run (a negative seed: numpy's unnamed error) or
    never (an infinite lr trained non-finite weights without a non-finite loss; negative thresholds,
    clips and tolerances silently meant off, a negative retain weight gradient ascent)."""
    with pytest.raises(ValueError, match=re.escape(message)):
        EditConfig(**{field: value})


def test_nan_loss_is_an_error_and_never_reaches_the_weights(tiny):
    params = jax.tree.map(lambda x: x, tiny.params)
    emb = np.array(params["model"]["embed_tokens"]["weight"])
    emb[:] = np.nan
    broken = tiny.with_params({**params, "model": {**params["model"], "embed_tokens": {"weight": jnp.asarray(emb)}}})
    with pytest.raises(NonFiniteLossError, match="non-finite loss in epoch 0"):
        edit(broken, REQUESTS, EditConfig(layers=(2,), **FAST), mesh=ONE_DEVICE)
    result = edit(broken, REQUESTS, EditConfig(layers=(2,), on_bad_record="skip", **FAST), mesh=ONE_DEVICE)
    assert np.isfinite(np.asarray(result.trainable["model.layers.2.mlp.down_proj.weight"])).all()


def test_a_depth_first_nan_names_the_request_not_an_epoch(tiny):
    params = tiny.params
    emb = np.array(params["model"]["embed_tokens"]["weight"])
    emb[:] = np.nan
    broken = tiny.with_params({**params, "model": {**params["model"], "embed_tokens": {"weight": jnp.asarray(emb)}}})
    wanted = "non-finite loss training request 0 of the depth-first run \\(2 steps\\)"
    with pytest.raises(NonFiniteLossError, match=wanted):
        edit(broken, REQUESTS[:2], EditConfig(layers=(2,), pipeline="df", **{**FAST, "epochs": 2}), mesh=ONE_DEVICE)


def test_retain_rows_are_weighted_and_keep_their_answers(tiny):
    from locft_jax.augment import retain_requests
    from locft_jax.engine.dataset import prepare_dataset

    keep = retain_requests(tiny.params, tiny.config, tiny.tokenizer, ["The sky is", "Two plus two is"], 4)
    ds = prepare_dataset(tiny.tokenizer, REQUESTS, retain=keep, retain_weight=0.5)
    assert list(ds.weight) == [1.0] * len(REQUESTS) + [0.5] * len(keep)
    with pytest.raises(RequestError, match="retain record 0: prompt 'Q' is also edited \\(record 6\\)"):
        prepare_dataset(tiny.tokenizer, REQUESTS, retain=[EditRequest("Q", "B")])
    eos = tiny.tokenizer.eos_token_id
    assert all(ds.target_ids[i][ds.target_mask[i]][-1] != eos for i in range(len(REQUESTS), len(ds)))

    def retain_loss(params):
        from locft_jax.evaluate import score_targets

        scores = score_targets(params, tiny.config, tiny.tokenizer, [r.prompt for r in keep],
                               [r.target_new for r in keep])
        return -np.mean([s.logprob.mean() for s in scores])

    cfg = EditConfig(layers=(2,), **{**FAST, "lr": 2e-2, "epochs": 8})
    without = edit(tiny, REQUESTS, cfg, mesh=ONE_DEVICE)
    with_retain = edit(tiny, REQUESTS, cfg.replace(retain_weight=4.0), retain=keep, mesh=ONE_DEVICE)
    assert retain_loss(with_retain.params) < retain_loss(without.params)
    with pytest.raises(ValueError, match="depth-first ablation takes none"):
        edit(tiny, REQUESTS, cfg.replace(pipeline="df"), retain=keep, mesh=ONE_DEVICE)


def test_early_stop_on_a_greedy_reliability_check(tiny):
    from locft_jax.evaluate import exact_match
    from locft_jax.generate import generate_greedy

    reqs = [EditRequest("Hello there", "Z"), EditRequest("Good bye", "Q"), EditRequest("Yes or no", "K")]
    cfg = EditConfig(layers=(2,), module="layer", **{**FAST, "lr": 3e-2, "epochs": 60, "batch_size": 3},
                     early_stop_reliability=1.0, check_every=2)
    result = edit(tiny, reqs, cfg, mesh=ONE_DEVICE)
    checks = [e["reliability_check"] for e in result.log if "reliability_check" in e]
    assert len(checks) == len(result.log) // 2 and checks[-1] == 1.0 and len(result.log) < 60
    answers = generate_greedy(result.params, tiny.config, tiny.tokenizer, [r.prompt for r in reqs])
    assert all(exact_match(a, r.target_new) for a, r in zip(answers, reqs, strict=True))


def test_incremental_editing_from_an_exported_checkpoint(tiny, tmp_path):
    from convert.to_hf import export_hf

    cfg = EditConfig(layers=(2,), **FAST)
    first = edit(tiny, REQUESTS[:5], cfg, mesh=ONE_DEVICE)
    export_hf(first.params, tiny.config, tiny.tokenizer, tmp_path / "hf")
    edited = load_model(tmp_path / "hf")
    name = "model.layers.2.mlp.down_proj.weight"
    np.testing.assert_array_equal(np.asarray(flatten(edited.params)[name]), np.asarray(first.trainable[name]))
    # new edits, replaying the earlier ones in the same breadth-first batches
    second = edit(edited, REQUESTS[5:] + REQUESTS[:5], cfg, mesh=ONE_DEVICE)
    assert _changed(edited.params, second.params) == {name}
    assert second.log[0]["loss"] < edit(tiny, REQUESTS[5:] + REQUESTS[:5], cfg, mesh=ONE_DEVICE).log[0]["loss"]
