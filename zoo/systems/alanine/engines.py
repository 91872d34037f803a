r"""External energy engines (OpenMM, tblite's GFN2-xTB) wrapped once for JAX.

Units, in this one place. Every engine computes, for a batch of configurations in
**nanometres**, the potential energy E in kJ/mol and the force F = −∇E in kJ/(mol·nm)
(an engine with other native units converts inside its ``_evaluate``). The shared
:meth:`AbstractEngine.reduced` then divides by k_B T = R·T, so what a model, a loss or a
data set sees is

    x in nm,   u(x) = E(x) / k_B T  (dimensionless),   f(x) = −∇_x u = F / k_B T  in 1/nm,

with R = 8.314462618·10⁻³ kJ/(mol·K) (CODATA 2018, exact), so k_B T = 2.494339 kJ/mol at
300 K. Atomic units (xTB): 1 Hartree = 2625.4996394799 kJ/mol, 1 Bohr = 0.0529177210903 nm
(CODATA 2018).

Failures. A configuration that the engine cannot evaluate (non-finite input, NaN output,
an exception such as an unconverged SCF or overlapping atoms) gets u = +inf and f = 0, and
an :class:`EngineFailureWarning` names how many failed; the rest of the batch is returned
normally. A batch of the wrong shape raises ``ValueError``.

JAX. :func:`engine_energy` is a ``jax.custom_jvp`` around ``jax.pure_callback``: the
primal is u, the tangent is −f·ẋ, so ``jax.grad`` gives −f from one engine call per
configuration, and ``jax.vmap`` hands the whole batch to the host in one callback
(``vmap_method="broadcast_all"``), where the engine loops over it (or spreads it over worker
processes). Second derivatives are not available (the force itself is not differentiable).
"""

from __future__ import annotations

import abc
import atexit
import concurrent.futures
import concurrent.futures.process
import dataclasses
import functools
import os
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from zoo._types import Array, Scalar
from zoo._workers import spawn_pool

MOLAR_GAS_CONSTANT = 8.314462618e-3  # R in kJ/(mol K), CODATA 2018 (exact)
HARTREE_KJ_PER_MOL = 2625.4996394799  # CODATA 2018
BOHR_NM = 0.0529177210903  # CODATA 2018


def kbt_kj_per_mol(temperature: float) -> float:
    """k_B T in kJ/mol: R·T (2.494339 kJ/mol at 300 K)."""
    return MOLAR_GAS_CONSTANT * temperature


class EngineFailureWarning(RuntimeWarning):
    """Some configurations of a batch could not be evaluated (energy +inf, force 0)."""


class AbstractEngine(abc.ABC):
    """A hashable description of an external energy engine for ``n_atoms`` atoms.

    Concrete engines are frozen dataclasses with ``n_atoms`` (atoms of one configuration)
    and ``temperature`` (K, sets k_B T), and implement :meth:`_evaluate` (nm in, kJ/mol and
    kJ/(mol·nm) out, NaN for a failed configuration). Heavy objects (OpenMM contexts, xTB
    calculators, process pools) live in per-process caches keyed by the engine, so the
    engine itself stays a small, picklable, hashable value that JAX holds as a static
    argument.
    """

    n_atoms: int
    temperature: float

    @abc.abstractmethod
    def _evaluate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(b, n_atoms, 3) float64 nm → energies (b,) kJ/mol, forces (b, n_atoms, 3) kJ/(mol·nm).

        Only finite inputs reach this method. A configuration that fails returns NaN.
        """

    def check_positions(self, positions) -> np.ndarray:
        """A batch as float64 (b, n_atoms, 3); accepts (b, 3·n_atoms) or (n_atoms, 3) too."""
        x = np.asarray(positions, dtype=np.float64)
        n = self.n_atoms
        if x.ndim == 2 and x.shape == (n, 3):
            x = x[None]
        elif x.ndim == 2 and x.shape[1] == 3 * n:
            x = x.reshape(-1, n, 3)
        if x.ndim != 3 or x.shape[1:] != (n, 3):
            raise ValueError(
                f"{type(self).__name__} needs configurations of {n} atoms, shape (b, {n}, 3) or (b, {3 * n}) "
                f"in nm; got shape {np.shape(positions)}"
            )
        return x

    def energies_and_forces_kj(self, positions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Energies (b,) kJ/mol, forces (b, n, 3) kJ/(mol·nm) and a failure mask (b,).

        Failed configurations carry energy +inf and force 0; a warning says how many.
        """
        x = self.check_positions(positions)
        b = x.shape[0]
        energies = np.full(b, np.nan)
        forces = np.zeros_like(x)
        finite = np.isfinite(x).all(axis=(1, 2))
        if finite.any():
            e, f = self._evaluate(x[finite])
            energies[finite] = e
            forces[finite] = f
        failed = ~(np.isfinite(energies) & np.isfinite(forces).all(axis=(1, 2)))
        if failed.any():
            energies[failed] = np.inf
            forces[failed] = 0.0
            warnings.warn(
                f"{type(self).__name__}: {int(failed.sum())} of {b} configurations could not be evaluated "
                f"({int((~finite).sum())} had non-finite coordinates); their energy is +inf and force 0",
                EngineFailureWarning,
                stacklevel=2,
            )
        return energies, forces, failed

    def reduced(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """Reduced energies u = E/k_BT (b,) and forces f = F/k_BT (b, n, 3) in 1/nm, float64."""
        e, f, _ = self.energies_and_forces_kj(positions)
        kbt = kbt_kj_per_mol(self.temperature)
        return e / kbt, f / kbt


# ---------------------------------------------------------------------------------------
# JAX wrapping, shared by every engine.


def _callback(engine: AbstractEngine, x: Array) -> tuple[Array, Array]:
    """(u, f) of flat configurations x (..., 3n) through one host callback."""
    shapes = (jax.ShapeDtypeStruct(x.shape[:-1], x.dtype), jax.ShapeDtypeStruct(x.shape, x.dtype))

    def host(xb):
        xb = np.asarray(xb)
        u, f = engine.reduced(xb.reshape(-1, engine.n_atoms, 3))
        return u.reshape(xb.shape[:-1]).astype(xb.dtype), f.reshape(xb.shape).astype(xb.dtype)

    return jax.pure_callback(host, shapes, x, vmap_method="broadcast_all")


def _check_flat(engine: AbstractEngine, x: Array) -> Array:
    x = jnp.asarray(x)
    dim = 3 * engine.n_atoms
    if x.shape == (engine.n_atoms, 3):
        x = x.reshape(dim)
    if x.shape != (dim,):
        raise ValueError(
            f"{type(engine).__name__} takes one configuration of shape ({dim},) or ({engine.n_atoms}, 3), got {x.shape}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _engine_energy(engine: AbstractEngine, x: Array) -> Scalar:
    return _callback(engine, x)[0]


@_engine_energy.defjvp
def _engine_energy_jvp(engine, primals, tangents):
    (x,), (dx,) = primals, tangents
    u, f = _callback(engine, x)
    # du = ∇u·dx = −f·dx; f is a residual, so reverse mode transposes this linear map.
    return u, -jnp.sum(f * dx)


def engine_energy(engine: AbstractEngine, x: Array) -> Scalar:
    r"""Reduced energy u(x) = E(x)/k_BT of ONE flat configuration (3n,) in nm.

    Differentiable once: ``jax.grad`` returns −f = −F/k_BT from the same engine call.
    """
    return _engine_energy(engine, _check_flat(engine, x))


def engine_energy_and_force(engine: AbstractEngine, x: Array) -> tuple[Scalar, Array]:
    """(u, f) of ONE flat configuration (3n,) from one engine call; batch with ``jax.vmap``."""
    return _callback(engine, _check_flat(engine, x))


# ---------------------------------------------------------------------------------------
# OpenMM


_OPENMM_CONTEXTS: dict = {}
_OPENMM_LOCK = threading.Lock()


@functools.lru_cache(maxsize=8)
def openmm_system(pdb_path: str, forcefield: tuple[str, ...]):
    """(topology, System) for a PDB file: no cutoff, no constraints (the alanine dipeptide benchmark convention; implicit solvent comes from the force-field files).

    Built once per process (a quarter of a second each time; the MD makes a Context per
    chunk from it): the System is shared, so callers must not modify it.
    """
    import openmm.app as app

    pdb = app.PDBFile(str(pdb_path))
    ff = app.ForceField(*forcefield)
    system = ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=None, rigidWater=False)
    return pdb.topology, system


@dataclasses.dataclass(frozen=True)
class OpenMMEngine(AbstractEngine):
    """An OpenMM force field evaluated on the Reference platform (fastest for a few atoms).

    ``forcefield`` are the XML files handed to ``openmm.app.ForceField``; the system has no
    cutoff and no constraints. One Context per process, created on first use.
    """

    pdb_path: str
    n_atoms: int
    forcefield: tuple[str, ...] = ("amber99sbildn.xml", "amber99_obc.xml")
    platform: str = "Reference"
    temperature: float = 300.0

    def context(self):
        key = (self.pdb_path, self.forcefield, self.platform)
        ctx = _OPENMM_CONTEXTS.get(key)
        if ctx is None:
            import openmm

            _, system = openmm_system(self.pdb_path, self.forcefield)
            if system.getNumParticles() != self.n_atoms:
                raise ValueError(f"{self.pdb_path} has {system.getNumParticles()} atoms, expected {self.n_atoms}")
            # The integrator is never stepped; a Context needs one.
            ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(self.platform))
            _OPENMM_CONTEXTS[key] = ctx
        return ctx

    def _evaluate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import openmm.unit as unit

        energies = np.full(positions.shape[0], np.nan)
        forces = np.full(positions.shape, np.nan)
        kj, kj_nm = unit.kilojoule_per_mole, unit.kilojoule_per_mole / unit.nanometer
        with _OPENMM_LOCK:
            ctx = self.context()
            for i, x in enumerate(positions):
                try:
                    ctx.setPositions(x)
                    state = ctx.getState(getEnergy=True, getForces=True)
                    energies[i] = state.getPotentialEnergy().value_in_unit(kj)
                    forces[i] = state.getForces(asNumpy=True).value_in_unit(kj_nm)
                except Exception:  # an engine error marks this configuration failed, not the batch
                    pass
        return energies, forces


# ---------------------------------------------------------------------------------------
# tblite (GFN2-xTB)


_XTB_CALCULATORS: dict = {}
_XTB_POOLS: dict = {}
_XTB_LOCK = threading.Lock()


def _xtb_worker_init() -> None:
    # One OpenMP thread per worker: the pool, not OpenMP, spreads the batch over the cores.
    # This runs before tblite (and its OpenMP runtime) is first loaded in the worker.
    os.environ["OMP_NUM_THREADS"] = "1"


def xtb_pool(n_workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """``n_workers`` spawned processes for xTB work, one OpenMP thread each."""
    return spawn_pool(n_workers, initializer=_xtb_worker_init)


def _xtb_worker(engine: XTBEngine, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return engine._evaluate_here(positions)


def _shutdown_pools() -> None:
    for pool in _XTB_POOLS.values():
        pool.shutdown(wait=False, cancel_futures=True)
    _XTB_POOLS.clear()


def _release_calculators() -> None:
    # tblite frees a calculator in a callback that needs its library module; at interpreter
    # teardown that module may be gone first, and every cached calculator prints a traceback.
    _XTB_CALCULATORS.clear()


atexit.register(_shutdown_pools)
atexit.register(_release_calculators)


@dataclasses.dataclass(frozen=True)
class XTBEngine(AbstractEngine):
    r"""GFN2-xTB (or another tblite method) for a molecule of fixed elements.

    Native units are atomic: positions are converted nm → Bohr, the energy Hartree → kJ/mol
    after subtracting ``energy_offset`` (Hartree; an additive constant, irrelevant to the
    Boltzmann density, that keeps u small enough for float32), and the gradient
    Hartree/Bohr → kJ/(mol·nm). A batch is split over ``n_workers`` spawned processes
    with one OpenMP thread each (``n_workers=0``: in this process, with whatever thread
    count tblite picked up here). Spawned workers re-import the main program, so a script
    using workers needs the usual ``if __name__ == "__main__":`` guard.
    """

    atomic_numbers: tuple[int, ...]
    method: str = "GFN2-xTB"
    energy_offset: float = 0.0
    n_workers: int = 2
    accuracy: float = 1.0
    max_iterations: int = 250
    temperature: float = 300.0

    @property
    def n_atoms(self) -> int:  # type: ignore[override]
        return len(self.atomic_numbers)

    def calculator(self, positions_bohr: np.ndarray):
        """A cached tblite Calculator for this process, moved to ``positions_bohr``."""
        key = (self.atomic_numbers, self.method, self.accuracy, self.max_iterations)
        calc = _XTB_CALCULATORS.get(key)
        if calc is None:
            from tblite.interface import Calculator

            calc = Calculator(self.method, np.asarray(self.atomic_numbers), positions_bohr)
            calc.set("verbosity", 0)
            calc.set("accuracy", self.accuracy)
            calc.set("max-iter", self.max_iterations)
            _XTB_CALCULATORS[key] = calc
        else:
            calc.update(positions_bohr)
        return calc

    def singlepoint(self, positions_nm: np.ndarray, restart=None):
        """(energy kJ/mol, forces kJ/(mol·nm), tblite result) of one configuration (n, 3) nm.

        ``restart`` is a previous result to start the SCF from (for MD steps); exceptions
        from tblite (SCF not converged, atoms too close) propagate.
        """
        calc = self.calculator(np.asarray(positions_nm, np.float64) / BOHR_NM)
        res = calc.singlepoint(restart) if restart is not None else calc.singlepoint()
        energy = (res.get("energy") - self.energy_offset) * HARTREE_KJ_PER_MOL
        forces = -res.get("gradient") * (HARTREE_KJ_PER_MOL / BOHR_NM)
        return energy, forces, res

    def _evaluate_here(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        energies = np.full(positions.shape[0], np.nan)
        forces = np.full(positions.shape, np.nan)
        with _XTB_LOCK:  # one cached calculator per process
            for i, x in enumerate(positions):
                try:
                    energies[i], forces[i], _ = self.singlepoint(x)
                except Exception:  # tblite raises for an unconverged SCF or overlapping atoms
                    pass
        return energies, forces

    def pool(self) -> concurrent.futures.ProcessPoolExecutor:
        pool = _XTB_POOLS.get(self.n_workers)
        if pool is None:
            pool = xtb_pool(self.n_workers)
            _XTB_POOLS[self.n_workers] = pool
        return pool

    def _evaluate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.n_workers <= 0 or positions.shape[0] == 1:
            return self._evaluate_here(positions)
        chunks = np.array_split(positions, min(self.n_workers, positions.shape[0]))
        try:
            results = list(self.pool().map(_xtb_worker, [self] * len(chunks), chunks))
        except concurrent.futures.process.BrokenProcessPool as err:
            # Workers die at start-up when the main program cannot be re-imported (code
            # read from stdin, or a script without an ``if __name__ == "__main__":`` guard).
            _XTB_POOLS.pop(self.n_workers, None)
            warnings.warn(
                f"xTB worker processes failed ({err}); evaluating in this process instead. "
                "Scripts that use n_workers > 0 need an `if __name__ == '__main__':` guard.",
                RuntimeWarning,
                stacklevel=2,
            )
            return self._evaluate_here(positions)
        return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])


def shutdown_xtb_pools() -> None:
    """Stop the xTB worker processes of this process (they are restarted on demand)."""
    _shutdown_pools()
