"""``edit``: LocFT-BF's breadth-first loop (and the depth-first ablation) over a loaded model."""

from __future__ import annotations

import dataclasses
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from locft_jax.augment import preserve_texts
from locft_jax.engine import checkpoint as ckpt
from locft_jax.engine.config import EditConfig
from locft_jax.engine.dataset import batches, epoch_order, prepare_dataset
from locft_jax.engine.forward import merge
from locft_jax.engine.locations import Location, resolve_location, trainable_names
from locft_jax.engine.null_space import input_covariances, projectors_for, subject_scoped_keys
from locft_jax.engine.optimizer import freeze_labels, make_optimizer
from locft_jax.engine.packing import PackPlan, plan_shapes
from locft_jax.engine.prefix_cache import BatchFeeder, build_store, slots_per_batch
from locft_jax.engine.retain_kl import with_soft_targets
from locft_jax.engine.step import StepSpec, make_train_step
from locft_jax.files import write_text_atomic
from locft_jax.hosts import is_primary, same_on_every_process
from locft_jax.loading import Model
from locft_jax.model import check_attention_span
from locft_jax.params import Params, flatten
from locft_jax.requests import EditRequest
from locft_jax.sharding import (
    DATA_AXIS,
    MODEL_AXIS,
    REPLICATED_RULES,
    TENSOR_PARALLEL_RULES,
    make_mesh,
    param_shardings,
    replicated,
)


class NonFiniteLossError(FloatingPointError):
    """A NaN/inf loss; the weights were not updated by that step."""


@dataclasses.dataclass
class EditResult:
    """The edited params plus what happened: per-epoch log, compiles, skips, timing."""

    params: Params
    trainable: dict[str, jax.Array]
    location: Location
    log: list[dict[str, Any]]
    skipped_records: list[tuple[int, str]]
    compiles: int
    seconds: float
    cache_bytes: int
    skipped_retain: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # retain records skipped


def edit(
    model: Model,
    requests: Sequence[EditRequest],
    config: EditConfig | None = None,
    *,
    mesh: Mesh | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    log_path: str | Path | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    retain: Sequence[EditRequest] = (),
    preserve: Sequence[str] = (),
    preserve_subjects: Sequence[EditRequest] = (),
) -> EditResult:
    """Train the chosen module of ``model`` on ``requests``; the model itself is not modified.

    ``retain``: prompts with the pre-edit model's own answers (see ``locft_jax.augment``), mixed
    into the shuffled batches with loss weight ``config.retain_weight`` to keep unrelated facts
    (``config.retain_loss``: cross-entropy towards those answers, or KL from the pre-edit
    distributions along them; ``retain_kl``).
    ``preserve``: texts whose inputs to the edited tensors the update must not act on, with
    ``config.null_space_tol > 0`` (see ``null_space``); the retain rows' texts are added to them.
    ``preserve_subjects``: requests whose subject tokens the update must not act on, with
    ``config.null_space_scope == "subject"`` (which also preserves each edit prompt's non-subject tokens).
    Multi-host (``locft_jax.hosts``): call it on every process; process 0 alone shows progress and
    writes ``log_path``; ``checkpoint_dir`` must be on a file system every host sees.
    """
    start_time = time.perf_counter()
    config = config or EditConfig()
    mesh = mesh or make_mesh(config.model_parallel)
    params = place_on_mesh(model.params, model.config, mesh)
    location = resolve_location(model.config, config.layers, config.module)
    if retain and config.pipeline == "df":
        raise ValueError("retain requests are mixed into breadth-first batches; the depth-first ablation takes none")
    ds = prepare_dataset(
        model.tokenizer, requests, config.objective, config.max_length, config.on_bad_record,
        retain=retain, retain_weight=config.retain_weight,
    )
    check_attention_span(model.config, int(ds.seq_len.max()), "the longest request (prompt + target)")
    names = trainable_names(model.config, location)
    # before the prefix cache: a bad null-space setting fails fast, not after the long part
    projectors = _projectors(model, params, location, names, config, requests, retain, preserve, preserve_subjects,
                             mesh)
    soft = None
    if retain and config.retain_loss == "kl":
        ds, soft = with_soft_targets(params, model.config, ds)
        soft = jax.device_put(soft, replicated(mesh))
    point = location.cache_point() if config.prefix_cache else None
    store = build_store(params, model.config, location, point, ds, mesh, config.prefix_cache_device_bytes)

    flat = flatten(params)
    # float32 master copies of the trainable tensors, whatever the model's dtype; real copies,
    # since the step donates its buffers and the model's own params must stay intact
    trainable = {n: jnp.array(flat[n], jnp.float32, copy=True) for n in names}
    base = {n: jnp.array(flat[n], jnp.float32, copy=True) for n in names}
    shardings = {n: NamedSharding(mesh, flat[n].sharding.spec) for n in names}
    rows_per_batch = 1 if config.pipeline == "df" else config.batch_size
    steps_per_epoch = len(ds) if config.pipeline == "df" else -(-len(ds) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs if config.pipeline == "bf" else config.epochs
    trainable = jax.device_put(trainable, shardings)
    head_chunk = config.head_chunk if mesh.shape[MODEL_AXIS] == 1 else 0  # a split head stays plain
    spec = StepSpec(model.config, location, point, config.skip_step_loss, config.norm_constraint, head_chunk,
                    project_gradients=bool(projectors) and config.null_space_mode == "hard")
    tx, step, opt_shardings = _train_step_for(spec, config, total_steps, params, trainable, mesh)
    opt_state = jax.device_put(init_opt_state(tx, params, trainable), opt_shardings)
    compiles_before = step._cache_size()
    pack = pack_plan_for(ds, config, mesh)
    feeder = BatchFeeder(store, ds, rows_per_batch, mesh, pack)
    runner = _Runner(step, params, base, projectors, soft, feeder, opt_shardings)

    identity = ""  # the run's fingerprint, stored with its checkpoints: a resume must be of the same run
    if checkpoint_dir:
        identity = ckpt.fingerprint(
            config.to_dict(), ds.ids, ds.target_ids, [*preserve, *((r.prompt, r.subject) for r in preserve_subjects)],
            ckpt.tensor_checksums(base),  # the model edited: a checkpoint holds whole tensors, not changes
        )
    log: list[dict[str, Any]] = []
    first_epoch = 0
    latest = ckpt.latest_state(Path(checkpoint_dir)) if resume and checkpoint_dir else None
    # multi-host: restoring is collective, so every process must find the same checkpoint
    same_on_every_process(ckpt.epoch_of(latest), "the checkpoint to resume from (is checkpoint_dir on a file "
                                                 "system every host sees?)")
    if latest is not None:
        # checked before restoring: other tensors (module, layers) would fail inside orbax, unexplained
        meta = ckpt.read_meta(latest)
        if meta.get("fingerprint") != identity:
            raise ValueError(f"{latest}: checkpoint is from a different run (config, data or model changed); "
                             "not resuming")
        trainable, opt_state = ckpt.restore_state(latest, trainable, opt_state)
        log, first_epoch = meta["log"], meta["epoch"] + 1
        if config.pipeline == "bf" and log and _stops_early(log[-1], config):
            first_epoch = config.epochs  # the run had stopped early: it is finished, not interrupted
    if resume and log_path is not None and is_primary():
        # the log of the epochs the checkpoint holds: a line written before a kill cut its checkpoint
        # short belongs to an epoch that runs again, and would be there twice
        write_text_atomic(log_path, "".join(json.dumps(entry) + "\n" for entry in log))

    check = None
    if config.early_stop_reliability > 0:
        sample = [requests[i] for i in ds.kept[: min(ds.n_edits, CHECK_SAMPLE)]]
        check = _reliability_check(model, params, sample, {n: flat[n].dtype for n in names})
    primary = is_primary()  # multi-host: process 0 alone shows progress and writes the log
    hooks = _EpochHooks(_progress(progress and primary, config, steps_per_epoch, first_epoch), checkpoint_dir,
                        identity, log_path if primary else None, on_epoch)
    if config.pipeline == "df":
        trainable, opt_state = _depth_first(runner, trainable, opt_state, tx, config, first_epoch, log, hooks)
    else:
        trainable, opt_state = _breadth_first(runner, trainable, opt_state, config, first_epoch, log, hooks, check)
    hooks.close()
    dtypes = {n: flat[n].dtype for n in names}
    params = merge(params, {n: v.astype(dtypes[n]) for n, v in trainable.items()})
    seconds = time.perf_counter() - start_time
    compiles = step._cache_size() - compiles_before
    return EditResult(params, trainable, location, log, ds.skipped, compiles, seconds, store.cache_bytes,
                      ds.skipped_retain)


def place_on_mesh(params: Params, config, mesh: Mesh) -> Params:
    """``params`` as they are when already on ``mesh``'s devices; else laid out on it by the rules."""
    def on_mesh(x) -> bool:
        return isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh

    if all(on_mesh(x) for x in jax.tree.leaves(params)):
        return params
    rules = REPLICATED_RULES if mesh.shape[MODEL_AXIS] == 1 else TENSOR_PARALLEL_RULES
    return jax.device_put(params, param_shardings(config, params, mesh, rules))


# Jitted train steps of recent calls: a second ``edit`` with the same model shape, location and
# optimizer reuses the compiled step instead of compiling again.
_STEP_CACHE: OrderedDict[tuple, tuple] = OrderedDict()
_STEP_CACHE_SIZE = 8


def _train_step_for(spec: StepSpec, config: EditConfig, total_steps: int, params: Params, trainable, mesh: Mesh):
    """(optimizer, jitted step, optimizer-state shardings), built once per distinct setting."""
    shardings = {n: x.sharding for n, x in trainable.items()}
    optimizer_key = (config.lr, config.schedule, config.warmup_steps, config.grad_clip, total_steps)
    key = (spec, optimizer_key, tuple(shardings.items()), mesh)
    if key in _STEP_CACHE:
        _STEP_CACHE.move_to_end(key)
        return _STEP_CACHE[key]
    tx = make_optimizer(config, total_steps, freeze_labels(params, spec.config, list(trainable)))
    # Fixing the state's shardings up front keeps the step from recompiling after its first call:
    # Adam moments shard like their tensor (zeros_like keeps it), the step count is replicated.
    opt_shardings = jax.tree.map(
        lambda x: x.sharding if x.ndim else NamedSharding(mesh, PartitionSpec()), init_opt_state(tx, params, trainable)
    )
    entry = (tx, make_train_step(spec, tx, mesh, (shardings, opt_shardings)), opt_shardings)
    _STEP_CACHE[key] = entry
    if len(_STEP_CACHE) > _STEP_CACHE_SIZE:
        _STEP_CACHE.popitem(last=False)
    return entry


def init_opt_state(tx, params: Params, trainable: dict[str, jax.Array]):
    """Optimizer state over the full params structure: Adam moments exist for the edited tensors only."""
    return tx.init(merge(params, trainable))


def _projectors(
    model: Model, params, location, names, config: EditConfig, requests, retain, preserve, preserve_subjects, mesh
) -> dict:
    """Input-side null-space projectors of the trainable tensors (empty when ``null_space_tol`` is 0)."""
    if config.null_space_tol <= 0:
        for given, what in ((preserve, "preserve texts"), (preserve_subjects, "preserve_subjects")):
            if given:
                raise ValueError(f"{what} were given but null_space_tol is 0 (off); set it, e.g. 1e-3")
        if config.null_space_scope != "all":
            raise ValueError(f"null_space_scope={config.null_space_scope!r} needs null_space_tol > 0, e.g. 1e-3")
        return {}
    if preserve_subjects and config.null_space_scope != "subject":
        raise ValueError("preserve_subjects were given but null_space_scope is 'all'; set it to 'subject'")
    texts = list(preserve) + preserve_texts(retain)
    masks: list = [None] * len(texts)
    if config.null_space_scope == "subject":
        scoped, scoped_masks = subject_scoped_keys(model.tokenizer, requests, preserve_subjects)
        texts, masks = texts + scoped, masks + scoped_masks
    covariances = input_covariances(params, model.config, location, model.tokenizer, texts, config.max_length, masks)
    matrices = projectors_for(names, covariances, config.null_space_tol, config.null_space_mode)
    return jax.device_put(matrices, replicated(mesh))


def pack_plan_for(ds, config: EditConfig, mesh: Mesh) -> PackPlan | None:
    """The packed shapes the run's batches fit (``packing.plan_shapes``; ``None``: packing off, or depth-first)."""
    if not config.packing or config.pipeline != "bf":
        return None
    epoch_batches = [batches(epoch_order(len(ds), config.seed, e), config.batch_size) for e in range(config.epochs)]
    batch_rows = slots_per_batch(config.batch_size, mesh)
    return plan_shapes(ds.seq_len, ds.tgt_len, epoch_batches, batch_rows, mesh.shape[DATA_AXIS])


class _Runner:
    """Feeds a batch's rows to the jitted step."""

    def __init__(self, step, params, base, projectors, soft, feeder: BatchFeeder, opt_shardings):
        self.step, self.params, self.base, self.projectors, self.feed = step, params, base, projectors, feeder
        self.soft = soft
        self.ds, self.opt_shardings = feeder.ds, opt_shardings

    def __call__(self, trainable, opt_state, rows: np.ndarray):
        arrays, feed, seq_len, tgt_len = self.feed(rows)
        return self.step(trainable, opt_state, self.params, self.base, self.projectors, self.soft, arrays, feed,
                         seq_len=seq_len, tgt_len=tgt_len)



def _breadth_first(runner, trainable, opt_state, config: EditConfig, first_epoch: int, log: list, hooks, check):
    for epoch in range(first_epoch, config.epochs):
        t0 = time.perf_counter()
        losses, applied = [], []
        for rows in batches(epoch_order(len(runner.ds), config.seed, epoch), config.batch_size):
            trainable, opt_state, loss, ok = runner(trainable, opt_state, rows)
            losses.append(loss)
            applied.append(ok)
            hooks.step()
        losses_h = np.asarray(jax.device_get(losses), dtype=np.float64)
        _check_finite(losses_h, f"in epoch {epoch}", config)
        entry = _epoch_entry(epoch, losses_h, np.asarray(jax.device_get(applied)), t0, len(runner.ds))
        if check is not None and (epoch + 1) % config.check_every == 0:
            entry["reliability_check"] = check(trainable)
        log.append(entry)
        hooks.epoch_done(entry, trainable, opt_state, log)
        if _stops_early(entry, config):
            break
    return trainable, opt_state


def _stops_early(entry: dict[str, Any], config: EditConfig) -> bool:
    """Whether a breadth-first run stops after the epoch of ``entry`` (its loss, or its reliability check)."""
    if config.early_stop_loss > 0 and entry["loss"] < config.early_stop_loss:
        return True
    return entry.get("reliability_check", 0.0) >= config.early_stop_reliability > 0


def _depth_first(runner, trainable, opt_state, tx, config: EditConfig, first_epoch: int, log: list, hooks):
    """The ablation: each request trained alone to convergence (fresh Adam state), one after another.

    As EasyEdit's sequential FT, each request is its own edit: ``norm_constraint`` bounds its change
    around the weights it started from (not the run's start). A checkpoint after each request counts
    as an "epoch" of this loop, so resuming works too.
    """
    for index in range(first_epoch, len(runner.ds)):
        t0 = time.perf_counter()
        if config.norm_constraint > 0:  # a copy: the step donates ``trainable``'s buffers
            runner.base = jax.tree.map(jnp.copy, trainable)
        opt_state = jax.device_put(init_opt_state(tx, runner.params, trainable), runner.opt_shardings)
        losses, applied = [], []
        for _ in range(config.epochs):
            trainable, opt_state, loss, ok = runner(trainable, opt_state, np.array([index]))
            losses.append(float(loss))
            applied.append(bool(ok))
            if config.early_stop_loss > 0 and losses[-1] < config.early_stop_loss:
                break
        _check_finite(np.array(losses), f"training request {index} of the depth-first run", config)
        entry = _epoch_entry(index, np.array(losses), np.array(applied), t0, 1)
        log.append(entry)
        hooks.step()
        hooks.epoch_done(entry, trainable, opt_state, log)
    return trainable, opt_state


CHECK_SAMPLE = 64


def _reliability_check(model: Model, params: Params, requests: list[EditRequest], dtypes: dict):
    """A function of the trainable tensors: share of ``requests`` whose greedy answer is the target."""
    from locft_jax.evaluate.generation_match import exact_match
    from locft_jax.generate import generate_greedy

    prompts = [r.prompt for r in requests]

    def check(trainable) -> float:
        edited = merge(params, {n: v.astype(dtypes[n]) for n, v in trainable.items()})
        answers = generate_greedy(edited, model.config, model.tokenizer, prompts)
        return float(np.mean([exact_match(a, r.target_new) for a, r in zip(answers, requests, strict=True)]))

    return check


def _check_finite(losses: np.ndarray, where: str, config: EditConfig) -> None:
    """Raise ``NonFiniteLossError`` naming ``where`` (an epoch, or a depth-first request) if a loss is NaN/inf."""
    if np.isfinite(losses).all():
        return
    message = f"non-finite loss {where} ({int((~np.isfinite(losses)).sum())} steps); weights kept from before"
    if config.on_bad_record == "error":
        raise NonFiniteLossError(message)


def _epoch_entry(epoch: int, losses: np.ndarray, applied: np.ndarray, t0: float, n_edits: int) -> dict[str, Any]:
    seconds = time.perf_counter() - t0
    finite = losses[np.isfinite(losses)]
    return {
        "epoch": epoch,
        "loss": float(finite.mean()) if finite.size else float("nan"),
        "steps": int(losses.size),
        "steps_skipped": int((~applied).sum()),
        "seconds": seconds,
        "edits_per_second": n_edits / seconds if seconds > 0 else float("inf"),
    }


@dataclasses.dataclass
class _EpochHooks:
    """What happens around the loop: progress bar, JSON-lines log, checkpoints, user callback."""

    bar: Any
    checkpoint_dir: str | Path | None
    identity: str
    log_path: str | Path | None
    on_epoch: Callable[[dict[str, Any]], None] | None

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def epoch_done(self, entry: dict[str, Any], trainable, opt_state, log: list) -> None:
        if self.bar is not None:
            self.bar.set_postfix(
                epoch=entry["epoch"], loss=f"{entry['loss']:.4f}", eps=f"{entry['edits_per_second']:.1f}"
            )
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        if self.checkpoint_dir is not None:
            meta = {"log": log, "fingerprint": self.identity}
            ckpt.save_state(Path(self.checkpoint_dir), entry["epoch"], trainable, opt_state, meta)
        if self.on_epoch is not None:
            self.on_epoch(entry)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress(enabled: bool, config: EditConfig, steps_per_epoch: int, first_epoch: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    if config.pipeline == "df":
        return tqdm(total=steps_per_epoch, initial=first_epoch, desc="edit (depth-first)", unit="edit")
    total = steps_per_epoch * config.epochs
    return tqdm(total=total, initial=steps_per_epoch * first_epoch, desc="edit", unit="step")
