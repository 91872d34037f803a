r"""A trained flow with its target, as a Python object: :func:`load` and :class:`BoltzmannGenerator`.

    import zoo
    bg = zoo.load("dw4_eqotfm_pg")            # a model name (downloaded, verified) or a checkpoint folder
    s = bg.sample(1000, seed=0)                # x (n, *event_shape), log_q, energy, log_w, path_length
    zoo.reweight(s["energy"], s["log_w"])      # E_p[u] ± standard error, with the ESS
    bg.log_prob(s["x"]), bg.score(s["x"][:4])  # log q_θ(x) and ∇ₓ log q_θ(x)

Everything here is what the tools compute, in the same conventions: samples are in the
target's event shape, log densities are of the folded flow where the target folds (the
alanine dipeptide mirror image, :meth:`zoo.systems.AbstractTarget.fold`), log weights are
$-u - \log q$ (Z unknown), and chunked solves are checked against per-sample ones.
Loading parses the checkpoint's stored gin configuration without touching the caller's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from zoo.data import as_event_batch
from zoo.experiments import config
from zoo.experiments.config import ConfigError
from zoo.flows.cnf import CNF, log_prob_chunked, sample_and_log_prob_chunked
from zoo.losses.pg import grad_log_prob
from zoo.metrics import energies_chunked

#: Sample file formats: NumPy archives (every array) and arrays (positions only), and mdtraj
#: trajectories (molecular systems) with the per-sample numbers in a .npz beside them.
SAMPLE_FORMATS = ("npz", "npy", "pdb", "dcd", "h5")
_TRAJECTORY_FORMATS = ("pdb", "dcd", "h5")


def draw_samples(flow, system, n: int, *, seed: int = 0, chunk_size: int = 1024, progress: bool = False) -> dict[str, np.ndarray]:
    """n samples of ``flow`` for ``system``: ``x`` (n, *event_shape), ``log_q``, ``energy``,
    ``log_w`` = −u − log q and ``path_length`` (each (n,)), folded where the target folds."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    res = sample_and_log_prob_chunked(flow, jax.random.PRNGKey(seed), n, chunk_size=chunk_size, progress=progress)
    x, log_q = system.fold(flow, res["x"], res["log_q"])
    energy = energies_chunked(system, x)
    return {"x": x.reshape(n, *system.event_shape), "log_q": log_q, "energy": energy, "log_w": -energy - log_q, "path_length": res["path_length"]}


def sample_format(path, format: str | None = None) -> str:
    """The format to write ``path`` in: ``format`` if given, else its suffix when known, else npz."""
    if format is None:
        suffix = Path(path).suffix.lstrip(".").lower()
        format = {"hdf5": "h5"}.get(suffix, suffix) if suffix in (*SAMPLE_FORMATS, "hdf5") else "npz"
    if format not in SAMPLE_FORMATS:
        raise ConfigError(f"unknown sample format {format!r}; expected one of {', '.join(SAMPLE_FORMATS)}")
    return format


def save_samples(samples: dict, system, path, format: str | None = None) -> list[Path]:
    """Write :func:`draw_samples` output; returns the files written.

    ``npz``: every array; ``npy``: the positions (n, *event_shape) with the per-sample
    numbers in ``<stem>.npz`` beside it; ``pdb``/``dcd``/``h5``: an mdtraj trajectory in
    the target's topology and length unit (nm), which needs a molecular target, with the
    per-sample numbers beside it likewise. Each file appears complete or not at all.
    """
    from zoo.storage import write_atomic, write_atomic_path, write_npz

    path = Path(path)
    format = sample_format(path, format)
    numbers = {k: v for k, v in samples.items() if k != "x"}
    if format == "npz":
        return [write_npz(path, **samples)]
    beside = path.with_suffix(".npz") if path.suffix else path.with_name(path.name + ".npz")
    if format == "npy":
        written = write_atomic(path, lambda f: np.save(f, samples["x"]))
    else:
        topology = system.topology()
        if topology is None:
            raise ConfigError(f"{type(system).__name__} has no molecular topology, so no {format} trajectory: write npz or npy")
        import mdtraj

        trajectory = mdtraj.Trajectory(np.asarray(samples["x"], np.float32).reshape(len(samples["x"]), -1, 3), topology)
        save = {"pdb": trajectory.save_pdb, "dcd": trajectory.save_dcd, "h5": trajectory.save_hdf5}[format]
        written = write_atomic_path(path, lambda tmp: save(str(tmp)))
    return [written, write_npz(beside, **numbers)]


@dataclasses.dataclass(frozen=True)
class BoltzmannGenerator:
    """A flow ``flow`` trained to sample ``system``'s Boltzmann distribution, and where it came from."""

    system: object
    flow: CNF
    source: str
    step: int

    def _flat(self, x) -> np.ndarray:
        return as_event_batch(x, tuple(self.system.event_shape)).reshape(-1, self.system.dim)

    def sample(self, n: int, *, seed: int = 0, chunk_size: int = 1024, progress: bool = False) -> dict[str, np.ndarray]:
        """n samples: ``x`` (n, *event_shape), ``log_q`` (n,), ``energy`` (n,), ``log_w`` = −u − log q, ``path_length``.

        The same samples, log densities and fold as ``tools/sample --seed=SEED``.
        """
        return draw_samples(self.flow, self.system, n, seed=seed, chunk_size=chunk_size, progress=progress)

    def save(self, samples: dict, path, format: str | None = None) -> list[Path]:
        """:func:`save_samples`: npz, npy, or (molecules) a pdb/dcd/h5 trajectory mdtraj opens."""
        return save_samples(samples, self.system, path, format)

    def log_prob(self, x, *, seed: int = 0, chunk_size: int = 1024, progress: bool = False) -> np.ndarray:
        """log q_θ(x) for samples (n, *event_shape) or (n, dim), of the folded flow where the target folds.

        ``seed`` draws the Hutchinson noise of flows that estimate the divergence.
        """
        flat = self._flat(x)
        key = jax.random.PRNGKey(seed) if self.flow.needs_key else None
        log_q = log_prob_chunked(self.flow, flat, key=key, chunk_size=chunk_size, progress=progress)["log_q"]
        return self.system.fold(self.flow, flat, log_q)[1]

    def score(self, x) -> np.ndarray:
        r"""∇ₓ log q_θ(x) (same shape as ``x``): the flow's own density, not the folded one.

        Solved by the augmented adjoint ODE of the path-gradient estimator with the flow's
        divergence (exact here; a Hutchinson flow's score is its exact-trace one).
        """
        shape = np.shape(x)
        flat = jnp.asarray(self._flat(x))
        exact = self.flow.with_settings(divergence="exact") if self.flow.needs_key else self.flow
        grads = _score_batch(exact, flat)
        return np.asarray(grads).reshape(shape)

    def energy(self, x) -> np.ndarray:
        """The target's reduced energy u(x) = E/k_BT for samples (n, *event_shape) or (n, dim)."""
        return energies_chunked(self.system, self._flat(x))


@eqx.filter_jit
def _score_batch(flow, x):
    return jax.vmap(lambda xi: grad_log_prob(flow, xi)[0])(x)


def load(name_or_path, *, bindings=()) -> BoltzmannGenerator:
    """A pretrained model by model name (downloaded and verified once), or a checkpoint folder.

    A released model comes with the solver settings its released metrics were computed
    with. ``bindings`` are gin bindings parsed after the checkpoint's stored configuration
    (e.g. ``"CNF.solver = 'rk4'"``, ``"CNF.n_steps = 40"``); they must not change the
    model's structure. The caller's own gin configuration is left as it was.
    """
    from zoo.experiments.runs import load_flow

    with config.isolated():
        system, flow, restored = load_flow(name_or_path, extra_bindings=bindings)
    return BoltzmannGenerator(system=system, flow=flow, source=str(name_or_path), step=restored.step)
