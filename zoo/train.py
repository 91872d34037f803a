"""The training loop: optax, a jit-compiled step with gradient accumulation and clipping,
non-finite steps skipped, periodic evaluation, JSON-lines log, atomic checkpoints, exact resume.

Randomness is a pure function of (seed, step): the batch order comes from a per-epoch
permutation seeded by (seed, epoch) and the loss key is ``fold_in(key, step)``. A run
resumed from its checkpoint at step N therefore continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from zoo import checkpoint as ckpt
from zoo import parallel, storage
from zoo.data import Batch, Dataset
from zoo.errors import ConfigError, ZooError, did_you_mean
from zoo.optim import parameter_average_of, with_clipping, with_parameter_average
from zoo.progress import bar as progress_bar


@dataclasses.dataclass
class TrainState:
    step: int
    model: eqx.Module
    opt_state: optax.OptState
    key: jax.Array


class BatchSampler:
    """Deterministic batches of ``accumulation × micro_batch`` training indices for any step."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if batch_size > n:
            raise ValueError(f"batch size {batch_size} exceeds the {n} training samples")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = n // batch_size
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> np.ndarray:
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perm[within * self.batch_size : (within + 1) * self.batch_size]

    def micro_batches(self, split, step: int, accumulation: int) -> Batch:
        """Step ``step``'s samples of ``split`` as ``accumulation`` micro-batches (a leading axis)."""
        return jax.tree.map(lambda a: a.reshape(accumulation, -1, *a.shape[1:]), split.batch(self.indices(step)))


#: (smallest allowed value, whether None is allowed) of each integer setting of a run.
_INTEGER_SETTINGS = {
    "n_steps": (1, True),
    "batch_size": (1, False),
    "accumulation": (1, False),
    "log_every": (1, False),
    "eval_every": (0, False),
    "checkpoint_every": (0, False),
    "seed": (0, False),
    "n_devices": (1, True),
}


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """How a training run goes: its length, batches, weight average, cadence and seed.

    The one declaration of these settings for every workflow that trains: ``train``,
    ``finetune`` and ``compare`` build one from their gin bindings (``train.n_steps = …``)
    with :meth:`of`, and :func:`fit` runs by it. Checked on creation; errors name a setting
    as ``owner.name``, the binding that sets it.

    The run stops after ``n_steps`` optimiser steps (or ``n_epochs`` passes over the
    training set, rounded up to whole steps; give one of the two) or ``time_budget_s``
    seconds of training, whichever comes first. Each step consumes ``accumulation``
    micro-batches of ``batch_size`` samples, each split over ``n_devices`` local devices
    (default: all; :mod:`zoo.parallel`). ``clip_norm`` clips the gradient's global norm;
    ``ema_decay`` tracks a moving average of the weights, which is what is evaluated,
    checkpointed and returned. Every ``log_every`` steps a record goes to ``log.jsonl``,
    every ``eval_every`` steps the periodic evaluation runs and every ``checkpoint_every``
    a checkpoint is written (0: only at the end). With ``prepare_ahead`` the work of a loss
    that needs no parameters (an OT pairing of noise and data: :meth:`AbstractLoss.prepare
    <zoo.losses.base.AbstractLoss.prepare>`) runs for the next step in a second thread while
    the current step trains, where the process may use a second core; the numbers are those
    of a run without it.
    """

    owner: str = "fit"
    n_steps: int | None = None
    n_epochs: float | None = None
    time_budget_s: float | None = None
    batch_size: int = 256
    accumulation: int = 1
    clip_norm: float | None = None
    ema_decay: float | None = None
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 0
    progress: bool = True
    n_devices: int | None = None
    prepare_ahead: bool = True

    @classmethod
    def of(cls, owner: str, values: dict, defaults: dict | None = None) -> RunSettings:
        """The settings ``owner`` was given (``values``, e.g. its gin bindings) over its ``defaults``;
        a name that is no setting is refused with the closest ones."""
        known = [f.name for f in dataclasses.fields(cls) if f.name != "owner"]
        for name in values:
            if name not in known:
                hint = did_you_mean(name, known, prefix=f"{owner}.") or f"; its settings: {', '.join(known)}"
                raise ConfigError(f"{owner} has no setting {owner}.{name}{hint}")
        return cls(owner=owner, **{**(defaults or {}), **values})

    def __post_init__(self):
        for field in dataclasses.fields(self):
            name, value, binding = field.name, getattr(self, field.name), f"{self.owner}.{field.name}"
            if name in _INTEGER_SETTINGS:
                low, optional = _INTEGER_SETTINGS[name]
                if value is None and optional:
                    continue
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                    raise ConfigError(f"{binding} must be an integer >= {low}{' or None' if optional else ''}, got {value!r}")
            elif name in ("time_budget_s", "clip_norm", "n_epochs"):
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value)):
                    raise ConfigError(f"{binding} must be a positive number or None, got {value!r}")
            elif name == "ema_decay":
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1):
                    raise ConfigError(f"{binding} must be a number in [0, 1) or None, got {value!r}")
            elif name in ("progress", "prepare_ahead") and not isinstance(value, bool):
                raise ConfigError(f"{binding} must be True or False, got {value!r}")

    def replace(self, **changes) -> RunSettings:
        return dataclasses.replace(self, **changes)

    def steps_for(self, n_train: int) -> int | None:
        """The run's optimiser steps on ``n_train`` training samples (:func:`steps_for_budget`)."""
        return steps_for_budget(self.owner, self.n_steps, self.n_epochs, n_train, self.batch_size * self.accumulation)

    def check_length(self, n_train: int) -> int | None:
        """:meth:`steps_for`, refusing a run with neither a step count nor a time budget."""
        n_steps = self.steps_for(n_train)
        if n_steps is None and self.time_budget_s is None:
            raise ConfigError(f"give {self.owner}.n_steps, {self.owner}.n_epochs or {self.owner}.time_budget_s")
        return n_steps


def steps_for_budget(owner: str, n_steps: int | None, n_epochs: float | None, n_train: int, samples_per_step: int) -> int | None:
    """The run's optimiser steps: ``n_steps``, or ``n_epochs`` passes over ``n_train`` samples
    at ``samples_per_step`` each (an epoch is the ``n_train // samples_per_step`` whole batches
    :class:`BatchSampler` draws), rounded up. Giving both is an error naming the bindings."""
    if n_epochs is None:
        return n_steps
    if n_steps is not None:
        raise ConfigError(f"give {owner}.n_steps or {owner}.n_epochs, not both (got {n_steps} and {n_epochs})")
    if samples_per_step > n_train:
        raise ConfigError(f"{owner}.batch_size × accumulation = {samples_per_step} exceeds the {n_train} training samples")
    return max(1, math.ceil(n_epochs * (n_train // samples_per_step)))


class NonFiniteStepError(ZooError, FloatingPointError):
    """A training step whose loss or gradient is not finite where a finite one is needed."""


def _metrics_line(metrics: dict) -> str:
    """The headline metrics of a periodic evaluation, for the progress output."""
    shown = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return "  ".join(f"{k}={v:.4g}" for k, v in shown) or "done"


class RunExistsError(ZooError, FileExistsError):
    """A run would start in a folder that already holds one."""


#: The lock file a training process holds in its run folder (beside ``checkpoint/``).
RUN_LOCK = ".run.lock"


def _hold_run_folder(checkpoint_dir: Path) -> None:
    """Lock the run folder of ``checkpoint_dir`` for this process (:func:`zoo.storage.hold_folder`)."""

    def busy(folder):
        return RunExistsError(f"another process is training in {folder} (it holds {folder / RUN_LOCK}): let it finish or stop it first")

    storage.hold_folder(Path(checkpoint_dir).resolve().parent, RUN_LOCK, busy)


def claim_run_dir(checkpoint_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a fresh run over a previous one unless told to continue it or replace it,
    and refuse a second process on a run another one is training (:data:`RUN_LOCK`).

    With ``overwrite`` the previous run's checkpoints are removed; with ``resume`` they are kept.
    The run folder stays locked for this process until the :func:`fit` that claimed it returns
    (or, claimed outside ``fit``, until the process ends).
    """
    _hold_run_folder(checkpoint_dir)
    step_dir = ckpt.latest_checkpoint(checkpoint_dir)
    if resume or step_dir is None:
        return
    if not overwrite:
        raise RunExistsError(
            f"{checkpoint_dir} already holds a run (checkpoint {step_dir.name}): pass --resume to continue it "
            "or --overwrite to replace it"
        )
    shutil.rmtree(checkpoint_dir)


def step_key(key: jax.Array, step: int) -> jax.Array:
    """The PRNG key of training step ``step`` from the run's key."""
    return jax.random.fold_in(key, step)


#: Checkpoint metadata key: the training seconds (compilation, evaluation and saving excluded) up to that step.
TRAINED_SECONDS = "trained_s"

_STEP_CACHE: dict = {}
_PREPARE_CACHE: dict = {}


def micro_batch_keys(key: jax.Array, accumulation: int) -> jax.Array:
    """The loss keys of a step's ``accumulation`` micro-batches, from the step's key."""
    return jax.random.split(key, accumulation)


def make_prepare(loss_fn, accumulation: int):
    """``loss_fn.prepare`` compiled over a step's micro-batches (leading axis), with the step's keys;
    reused like :func:`make_step`."""
    return _built_once(_PREPARE_CACHE, (loss_fn, accumulation), _build_prepare)


def _build_prepare(loss_fn, accumulation: int):
    @eqx.filter_jit
    def prepare(base, batch: Batch, key):
        keys = micro_batch_keys(key, accumulation)
        return jax.lax.map(lambda inputs: loss_fn.prepare(base, *inputs), (batch, keys))

    return prepare


def runs_preparation_ahead(loss_fn, model, settings: RunSettings) -> bool:
    """Whether the loop runs the loss's preparation ahead: asked for, worth it, and not stale
    (a base with trainable arrays would be prepared with the previous step's)."""
    base = getattr(model, "base", None)
    if not (settings.prepare_ahead and getattr(loss_fn, "prepares_ahead", False)) or base is None:
        return False
    # On one core there is nothing to overlap, and it would hang: XLA's CPU client then runs one
    # thread, and the pairing's host callback, waiting there for its operand, never gets it
    # while the step is dispatched beside it (a run under ``taskset -c 0`` stopped at step 2).
    if parallel.usable_cpu_cores() < 2:
        return False
    return not jax.tree.leaves(eqx.filter(base, eqx.is_inexact_array))


def make_step(loss_fn, optimizer: optax.GradientTransformation, accumulation: int):
    """The compiled update for (loss, optimiser, accumulation), reused when all three are hashable.

    Reuse matters when one process trains many runs (``tools/compare``): a new step
    function would compile again for every run.
    """
    return _built_once(_STEP_CACHE, (loss_fn, optimizer, accumulation), _build_step)


def _built_once(cache: dict, args: tuple, build):
    """``build(*args)``, kept in ``cache`` for equal hashable ``args`` (a loss holding arrays is not)."""
    try:
        hash(args)
    except TypeError:
        return build(*args)
    if args not in cache:
        cache[args] = build(*args)
    return cache[args]


def _build_step(loss_fn, optimizer: optax.GradientTransformation, accumulation: int):
    """A jit-compiled update over ``accumulation`` micro-batches (leading axis of the batch).

    Gradients and aux values are averaged over micro-batches; a step whose loss or
    gradient is non-finite leaves parameters and optimiser state untouched.
    """

    @eqx.filter_jit
    def step(model, opt_state, batch: Batch, key):
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def micro(carry, inputs):
            grad_sum, loss_sum = carry
            micro_batch, k = inputs
            (loss, aux), grads = eqx.filter_value_and_grad(
                lambda p: loss_fn(eqx.combine(p, static), micro_batch, k), has_aux=True
            )(params)
            grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
            return (grad_sum, loss_sum + loss), aux

        zeros = jax.tree.map(jnp.zeros_like, params)
        keys = micro_batch_keys(key, accumulation)
        (grad_sum, loss_sum), aux = jax.lax.scan(micro, (zeros, jnp.zeros(())), (batch, keys))
        grads = jax.tree.map(lambda g: g / accumulation, grad_sum)
        loss = loss_sum / accumulation
        aux = jax.tree.map(lambda a: jnp.mean(a, axis=0), aux)
        grad_norm = _global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_params = keep(new_params, params)
        new_opt_state = keep(new_opt_state, opt_state)
        stats = {"loss": loss, "grad_norm": grad_norm, "finite": finite, **aux}
        return eqx.combine(new_params, static), new_opt_state, stats

    return step


_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


class JsonlLog:
    def __init__(self, path: Path, truncate_after_step: int | None = None):
        self.path = path
        if truncate_after_step is not None and path.exists():
            # On resume, drop lines written after the checkpoint so the log matches the state.
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= truncate_after_step]
            path.write_text("".join(ln + "\n" for ln in kept))
        self._f = open(path, "a")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_log(workdir) -> list[dict]:
    """Every record of a run's ``log.jsonl``, across the processes that resumed it."""
    path = Path(workdir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def _to_python(tree) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in tree.items()}


def _releasing_run_folders(train):
    """``train`` releases the run folders it claimed when it returns or raises."""

    @functools.wraps(train)
    def run(*args, **kwargs):
        held = set(storage.HELD_FOLDERS)
        try:
            return train(*args, **kwargs)
        finally:
            for folder in set(storage.HELD_FOLDERS) - held:
                storage.release_folder(folder)

    return run


@_releasing_run_folders
def fit(
    model,
    dataset: Dataset,
    loss_fn,
    optimizer: optax.GradientTransformation,
    settings: RunSettings,
    *,
    workdir: Path,
    evaluate: Callable | None = None,
    config: str = "",
    metadata: dict | None = None,
    resume: bool = False,
    overwrite: bool = False,
    checkpoint_dir: Path | None = None,
) -> tuple[eqx.Module, list[dict]]:
    """Train ``model`` on ``dataset.train`` with ``loss_fn`` as ``settings`` say; returns the model and the log records.

    A resumed run's time budget counts the seconds of the runs it continues, as stored in
    the checkpoint. A folder that already holds a run is refused unless ``resume``
    (continue it) or ``overwrite`` (replace it) is set (:func:`claim_run_dir`).
    ``evaluate(model, step)`` is the periodic evaluation (every ``settings.eval_every``
    steps; its seconds are not on the training clock).

    With ``settings.ema_decay`` the optimiser also tracks an exponential moving average of
    the weights (:func:`zoo.optim.parameter_average`); that average is what the periodic
    evaluation sees, what checkpoints store as their model (the training weights beside it,
    for resuming) and what is returned.
    """
    n_steps = settings.check_length(len(dataset.train))
    time_budget_s, batch_size, accumulation, seed = settings.time_budget_s, settings.batch_size, settings.accumulation, settings.seed
    log_every, eval_every, checkpoint_every = settings.log_every, settings.eval_every, settings.checkpoint_every
    if getattr(loss_fn, "needs_forces", False) and dataset.train.forces is None:
        raise ValueError(f"{type(loss_fn).__name__} needs target forces but the training data has none")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint_dir = Path(checkpoint_dir or workdir / "checkpoint")
    claim_run_dir(checkpoint_dir, resume=resume, overwrite=overwrite)
    data_hash = dataset.sha256()
    metadata = {"data_sha256": data_hash, "loss": type(loss_fn).__name__, **(metadata or {})}

    optimizer = with_parameter_average(with_clipping(optimizer, settings.clip_norm), settings.ema_decay)
    key = jax.random.PRNGKey(seed)
    state = TrainState(step=0, model=model, opt_state=optimizer.init(eqx.filter(model, eqx.is_inexact_array)), key=key)

    if resume and ckpt.latest_checkpoint(checkpoint_dir) is not None:
        restored = ckpt.load_checkpoint(
            checkpoint_dir, model_like=state.model, opt_state_like=state.opt_state, raw_model_like=state.model
        )
        stored_hash = restored.metadata.get("data_sha256")
        if stored_hash is not None and stored_hash != data_hash:
            raise ckpt.CheckpointMismatchError(
                f"cannot resume: the checkpoint was trained on data with sha256 {stored_hash[:12]}…, this run's data has {data_hash[:12]}…"
            )
        # With a moving average the checkpoint's model is the average; training continues from the raw weights.
        trained = restored.model if restored.raw_model is None else restored.raw_model
        state = TrainState(step=restored.step, model=trained, opt_state=restored.opt_state, key=restored.key)
        trained_s = float(restored.metadata.get(TRAINED_SECONDS, 0.0))
        print(f"resuming from step {state.step} after {trained_s:.1f} s of training ({checkpoint_dir})")
    else:
        trained_s = 0.0

    mesh = parallel.data_mesh(settings.n_devices)
    state = dataclasses.replace(state, model=parallel.replicate(state.model, mesh), opt_state=parallel.replicate(state.opt_state, mesh))

    log = JsonlLog(workdir / "log.jsonl", truncate_after_step=state.step if resume else None)
    if not resume:
        log.path.write_text("")
    step_fn = make_step(loss_fn, optimizer, accumulation)
    sampler = BatchSampler(len(dataset.train), batch_size * accumulation, seed)
    prepare_fn = make_prepare(loss_fn, accumulation) if runs_preparation_ahead(loss_fn, state.model, settings) else None
    base, run_key = getattr(state.model, "base", None), state.key

    def batch_for(step: int) -> Batch:
        batch = sampler.micro_batches(dataset.train, step, accumulation)
        if prepare_fn is not None:
            batch = prepare_fn(base, batch, step_key(run_key, step))
        return parallel.shard_batch(batch, mesh, axis=1)

    # One worker thread prepares step s + 1 while step s trains (JAX and the pairing's compiled
    # host code release the GIL); it is the only caller of the sampler.
    ahead = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="zoo-prepare") if prepare_fn is not None else None
    pending: concurrent.futures.Future | None = None  # the batch of step state.step, once the loop runs
    records: list[dict] = []

    def save(s: TrainState):
        model = averaged(s)
        # The training clock travels with the checkpoint, so that a resumed run's time budget
        # counts the time already spent instead of starting over.
        clock = {TRAINED_SECONDS: round(train_clock(), 3)}
        ckpt.save_checkpoint(
            checkpoint_dir,
            step=s.step,
            model=model,
            raw_model=None if model is s.model else s.model,
            opt_state=s.opt_state,
            key=s.key,
            config=config,
            metadata={**metadata, **clock},
        )

    bar = progress_bar(n_steps, "training", "step", initial=state.step, enabled=settings.progress)
    # The clock for time_budget_s starts after the first (compiling) step, so that equal
    # budgets compare training, not compilation; the compile time is logged separately.
    start = None
    compile_s = None
    paused_s = 0.0  # periodic evaluation and checkpoint writes, excluded from the training clock
    skipped = 0

    def train_clock() -> float:
        """Training seconds so far, this process's and those of the runs it resumes."""
        if start is None:
            return trained_s
        return trained_s + time.perf_counter() - start - paused_s

    try:
        while True:
            if n_steps is not None and state.step >= n_steps:
                break
            if time_budget_s is not None and (start is not None or trained_s > 0) and train_clock() >= time_budget_s:
                break
            t0 = time.perf_counter()  # the first step's compilation includes its batch's preparation
            if ahead is None:
                batch = batch_for(state.step)
            else:
                batch = (pending or ahead.submit(batch_for, state.step)).result()
                following = state.step + 1  # every step advances by one, skipped ones included
                pending = ahead.submit(batch_for, following) if n_steps is None or following < n_steps else None
            model, opt_state, stats = step_fn(state.model, state.opt_state, batch, step_key(state.key, state.step))
            stats = _to_python(jax.device_get(stats))
            state = TrainState(step=state.step + 1, model=model, opt_state=opt_state, key=state.key)
            if start is None:
                start = time.perf_counter()
                compile_s = start - t0
                log.write({"step": state.step, "compile_s": round(compile_s, 3)})
            if not stats["finite"]:
                skipped += 1
                bar.write(f"step {state.step}: non-finite loss or gradient ({stats['loss']}), update skipped")
            if state.step % log_every == 0 or state.step == 1 or state.step == n_steps or not stats["finite"]:
                record = {"step": state.step, "time_s": round(train_clock(), 3), **stats}
                log.write(record)
                records.append(record)
                bar.set_postfix(loss=f"{stats['loss']:.4g}", refresh=False)
            bar.update(1)
            if eval_every and evaluate is not None and state.step % eval_every == 0:
                eval_start = time.perf_counter()
                metrics = evaluate(averaged(state), state.step)
                paused_s += time.perf_counter() - eval_start
                bar.write(f"step {state.step}: evaluation " + _metrics_line(metrics))
                record = {"step": state.step, "time_s": round(train_clock(), 3), "eval": metrics}
                log.write(record)
                records.append(record)
            if checkpoint_every and state.step % checkpoint_every == 0:
                save_start = time.perf_counter()
                save(state)
                paused_s += time.perf_counter() - save_start
        if start is not None and (not records or records[-1].get("step") != state.step or "loss" not in records[-1]):
            # Always end the log with the final step, so callers see the steps and time used.
            record = {"step": state.step, "time_s": round(train_clock(), 3), **stats}
            log.write(record)
            records.append(record)
    finally:
        if ahead is not None:
            ahead.shutdown(wait=True, cancel_futures=True)
        bar.close()
        log.close()
    save(state)
    if skipped:
        print(f"{skipped} steps had a non-finite loss or gradient and were skipped")
    return averaged(state), records


def averaged(state: TrainState) -> eqx.Module:
    """The weights to evaluate: the moving average the optimiser tracks, else the training weights."""
    average = parameter_average_of(state.opt_state)
    if average is None:
        return state.model
    return eqx.combine(average, eqx.filter(state.model, eqx.is_inexact_array, inverse=True))
