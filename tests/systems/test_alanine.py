"""Alanine dipeptide: topology, dihedrals, encodings, OpenMM and xTB targets, data, generators."""

import json
import math
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.data import stored_dataset
from zoo.systems import alanine
from zoo.systems.alanine import data as alanine_data
from zoo.systems.alanine.engines import (
    BOHR_NM,
    HARTREE_KJ_PER_MOL,
    EngineFailureWarning,
    kbt_kj_per_mol,
)

CLASSICAL = alanine_data.ASSET_DATA / "ad2_classical"
XTB = alanine_data.ASSET_DATA / "ad2_xtb"
# The full xTB set (10 000 / 1 000 / 2 000 relaxations of states from 2 × 100 ns of MD), shipped so
# that training does not wait for the ~2 h of relaxations.
XTB_10K = alanine_data.ASSET_DATA / "ad2_xtb_10k"
KBT_300_KJ = 2.494338785  # R·T at 300 K by hand: 8.314462618e-3 kJ/(mol K) × 300 K


@pytest.fixture(scope="module")
def frames():
    """A few stored classical test frames, (n, 66) float64 nm."""
    return alanine_data.read_arrays(CLASSICAL, "test")["positions"][:64].astype(np.float64)


def random_rotation(rng):
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


# ---------------------------------------------------------------------------------------
# Topology, dihedrals, encodings (no engine needed)


def test_topology_matches_constants():
    top = alanine.topology()
    assert top.n_atoms == alanine.N_ATOMS == 22
    assert tuple(a.name for a in top.atoms) == alanine.ATOM_NAMES
    assert tuple(a.element.symbol for a in top.atoms) == alanine.ELEMENTS
    assert alanine.bonds().shape == (21, 2)


def test_dihedral_indices_are_mdtraj_phi_psi(frames):
    import mdtraj

    traj = mdtraj.Trajectory(frames[:2].reshape(-1, 22, 3), alanine.topology())
    assert tuple(mdtraj.compute_phi(traj)[0][0]) == alanine.PHI_ATOMS
    assert tuple(mdtraj.compute_psi(traj)[0][0]) == alanine.PSI_ATOMS


def test_dihedrals_equal_mdtraj(frames):
    import mdtraj

    rng = np.random.default_rng(0)
    # stored frames plus random distortions, so every quadrant of (φ, ψ) is exercised
    x = np.concatenate([frames, frames + 0.05 * rng.standard_normal(frames.shape)])
    phi, psi = jax.jit(jax.vmap(alanine.dihedrals))(jnp.asarray(x, jnp.float32))
    traj = mdtraj.Trajectory(x.reshape(-1, 22, 3).astype(np.float32), alanine.topology())
    for ours, ref in ((phi, mdtraj.compute_phi(traj)[1][:, 0]), (psi, mdtraj.compute_psi(traj)[1][:, 0])):
        diff = np.angle(np.exp(1j * (np.asarray(ours) - ref)))  # compare on the circle
        assert np.abs(diff).max() < 1e-5
    assert (np.asarray(phi) > 0).any() and (np.asarray(phi) < 0).any()


def test_dihedrals_gradient_matches_finite_differences(frames, x64):
    x = jnp.asarray(frames[3])
    v = jnp.asarray(np.random.default_rng(1).standard_normal(66))
    h = 1e-6
    for k in range(2):
        f = lambda y: alanine.dihedrals(y)[k]  # noqa: E731, B023  (used within the iteration)
        fd = (f(x + h * v) - f(x - h * v)) / (2 * h)
        assert jnp.dot(jax.grad(f)(x), v) == pytest.approx(float(fd), rel=1e-6, abs=1e-8)


def test_dihedrals_reject_wrong_shape():
    with pytest.raises(ValueError, match="66"):
        alanine.dihedrals(jnp.zeros(63))


def test_efm_encoding():
    enc = alanine.efm_encoding()
    assert enc.shape == (22,) and enc.dtype == np.int32
    backbone = list(alanine.BACKBONE_ATOMS)
    assert sorted(enc[backbone].tolist()) == [4, 5, 6, 7, 8]  # each backbone atom its own class
    others = [i for i in range(22) if i not in backbone]
    by_element = {"H": 0, "C": 1, "N": 2, "O": 3}
    assert [enc[i] for i in others] == [by_element[alanine.ELEMENTS[i]] for i in others]


def test_tbg_encoding():
    enc = alanine.tbg_encoding()
    assert enc.shape == (22,) and len(set(enc.tolist())) == 16
    for methyl in ((0, 2, 3), (11, 12, 13), (19, 20, 21)):
        assert len({enc[i] for i in methyl}) == 1
    shared = {0, 2, 3, 11, 12, 13, 19, 20, 21}
    singles = [enc[i] for i in range(22) if i not in shared]
    assert len(set(singles)) == len(singles) == 13
    # a methyl class is never shared with any other atom (e.g. its carbon)
    assert enc[1] != enc[0] and enc[10] != enc[11] and enc[18] != enc[19]


def test_encoding_choice_and_field_kwargs():
    target = alanine.AlanineDipeptideClassical(encoding="efm")
    kw = target.field_kwargs()
    assert kw["n_particles"] == 22 and kw["spatial_dim"] == 3 and kw["dim"] == 66
    np.testing.assert_array_equal(kw["atom_types"], alanine.efm_encoding())
    assert target.default_base().dim == 66
    with pytest.raises(ValueError, match="encoding"):
        alanine.AlanineDipeptideClassical(encoding="nope")


def test_units_by_hand():
    assert kbt_kj_per_mol(300.0) == pytest.approx(KBT_300_KJ, rel=1e-9)
    assert kbt_kj_per_mol(300.0) == pytest.approx(2.494, abs=5e-4)


# ---------------------------------------------------------------------------------------
# Classical target (OpenMM)


# ---------------------------------------------------------------------------------------
# Chirality: the data are L; an E(3)-equivariant flow's mirror images are folded onto L


def _mdtraj_handedness(xyz):
    """Handedness from mdtraj's own geometry: the sign of the improper dihedral N–CA–C–CB."""
    import mdtraj

    traj = mdtraj.Trajectory(np.asarray(xyz, np.float32).reshape(-1, 22, 3), alanine.topology())
    return np.sign(mdtraj.compute_dihedrals(traj, [[6, 8, 14, 10]])[:, 0])


def test_handedness_flips_under_reflection_and_agrees_with_mdtraj(frames):
    h = alanine.handedness(frames)
    assert np.all(h == alanine.l_handedness())  # MD from the L structure never inverts
    mirror = frames.reshape(-1, 22, 3) * np.array([1.0, 1.0, -1.0])  # a plane reflection
    assert np.all(alanine.handedness(mirror) == -h)
    assert np.all(alanine.handedness(-frames) == -h)  # inversion is improper too
    rng = np.random.default_rng(3)
    rotated = frames.reshape(-1, 22, 3) @ random_rotation(rng).T
    assert np.all(alanine.handedness(rotated) == h)
    # A second computation: the improper dihedral's sign separates the two enantiomers alike.
    improper = _mdtraj_handedness(frames)
    assert np.all(_mdtraj_handedness(-frames) == -improper) and len(np.unique(improper)) == 1


def test_shipped_data_sets_are_all_l():
    for folder in (CLASSICAL, XTB, XTB_10K):
        for split in ("train", "val", "test"):
            positions = alanine_data.read_arrays(folder, split)["positions"]
            assert np.all(alanine.handedness(positions) == alanine.l_handedness()), (folder.name, split)


def _tiny_flow(field_kind: str):
    from zoo.fields import EGNNField, MLPField
    from zoo.flows import CNF, MeanFreeNormal

    key = jax.random.PRNGKey(0)
    if field_kind == "egnn":
        field = EGNNField(22, 3, hidden=8, n_layers=1, atom_types=alanine.encoding("tbg"), key=key)
    else:
        field = MLPField(66, width=8, depth=1, key=key)
    return CNF(field, MeanFreeNormal(22, 3, scale=0.16), n_steps=2)


def test_fold_maps_mirror_images_onto_l_and_doubles_the_density(frames):
    system = alanine.AlanineDipeptideClassical()
    flow = _tiny_flow("egnn")
    # Premise of the fold: the EGNN flow gives x and −x the same density.
    x = jnp.asarray(frames[:6], jnp.float32) - jnp.asarray(frames[:6], jnp.float32).reshape(6, 22, 3).mean(1).repeat(22, 0).reshape(6, 66)
    np.testing.assert_allclose(flow.log_prob(x), flow.log_prob(-x), rtol=1e-5, atol=1e-3)
    mixed = np.concatenate([np.asarray(x[:3]), -np.asarray(x[3:])])
    log_q = np.arange(6.0)
    folded, folded_log_q = system.fold(flow, mixed, log_q)
    assert np.all(alanine.handedness(folded) == alanine.l_handedness())
    np.testing.assert_array_equal(folded[:3], mixed[:3])
    np.testing.assert_array_equal(folded[3:], -mixed[3:])
    np.testing.assert_allclose(folded_log_q, log_q + math.log(2.0))
    # Switched off, or for a field without the symmetry, nothing changes.
    off = alanine.AlanineDipeptideClassical(fold_mirror_images=False)
    for sys_, flow_ in ((off, flow), (system, _tiny_flow("mlp"))):
        same_x, same_log_q = sys_.fold(flow_, mixed, log_q)
        np.testing.assert_array_equal(same_x, mixed)
        np.testing.assert_array_equal(same_log_q, log_q)


def test_classical_energy_is_mirror_symmetric(classical, frames):
    """Why the fold keeps weights valid: the mirror image has the same energy."""
    u, _ = classical.energies_and_forces(frames[:8])
    u_mirror, _ = classical.energies_and_forces(-frames[:8])
    np.testing.assert_allclose(u_mirror, u, atol=1e-6)


@pytest.fixture(scope="module")
def classical():
    pytest.importorskip("openmm")
    return alanine.AlanineDipeptideClassical()


def test_classical_energy_in_kbt_by_hand(classical, frames, x64):
    import openmm
    import openmm.app as app
    import openmm.unit as unit

    # An independent OpenMM system, built here, evaluated in kJ/mol and converted by hand.
    pdb = app.PDBFile(str(alanine.PDB_PATH))
    system = app.ForceField("amber99sbildn.xml", "amber99_obc.xml").createSystem(
        pdb.topology, nonbondedMethod=app.NoCutoff, constraints=None
    )
    ctx = openmm.Context(system, openmm.VerletIntegrator(1.0), openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(frames[0].reshape(22, 3))
    state = ctx.getState(getEnergy=True, getForces=True)
    e_kj = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    f_kj = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    u, f = classical.energy_and_force(jnp.asarray(frames[0]))
    assert float(u) == pytest.approx(e_kj / KBT_300_KJ, rel=1e-7)
    np.testing.assert_allclose(np.asarray(f), f_kj.reshape(-1) / KBT_300_KJ, rtol=1e-7, atol=1e-7)


def test_classical_grad_is_minus_force_batched(classical, frames):
    x = jnp.asarray(frames[:8], jnp.float32)
    u = jax.jit(jax.vmap(classical.energy))(x)
    f = jax.jit(jax.vmap(classical.force))(x)
    u_ref, f_ref = classical.energies_and_forces(np.asarray(x))
    np.testing.assert_allclose(np.asarray(u), u_ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(f), f_ref, rtol=1e-4, atol=1e-2)
    assert u.dtype == jnp.float32 and f.shape == (8, 66)


def test_classical_forces_match_finite_differences(classical, frames, x64):
    x = jnp.asarray(frames[5])
    rng = np.random.default_rng(2)
    f = classical.force(x)
    h = 1e-5
    for _ in range(3):
        v = jnp.asarray(rng.standard_normal(66))
        v = v / jnp.linalg.norm(v)
        fd = (classical.energy(x + h * v) - classical.energy(x - h * v)) / (2 * h)
        assert float(-jnp.dot(f, v)) == pytest.approx(float(fd), rel=1e-4, abs=1e-3)


def test_classical_rigid_motion(classical, frames, x64):
    rng = np.random.default_rng(3)
    x = frames[7].reshape(22, 3)
    rot, shift = random_rotation(rng), rng.standard_normal(3)
    y = x @ rot.T + shift
    u_x, f_x = classical.energy_and_force(jnp.asarray(x.reshape(-1)))
    u_y, f_y = classical.energy_and_force(jnp.asarray(y.reshape(-1)))
    assert float(u_y) == pytest.approx(float(u_x), rel=1e-9, abs=1e-8)
    # forces rotate with the molecule and sum to zero
    np.testing.assert_allclose(np.asarray(f_y).reshape(22, 3), np.asarray(f_x).reshape(22, 3) @ rot.T, atol=1e-6)
    assert np.abs(np.asarray(f_x).reshape(22, 3).sum(0)).max() < 1e-6


def test_classical_nan_gives_inf_not_crash(classical, frames):
    x = np.array(frames[:3], np.float32)
    x[1, 5] = np.nan
    with pytest.warns(EngineFailureWarning, match="1 of 3"):
        u = np.asarray(jax.vmap(classical.energy)(jnp.asarray(x)))
    with pytest.warns(EngineFailureWarning):
        f = np.asarray(jax.vmap(classical.force)(jnp.asarray(x)))
    assert u[1] == np.inf and np.isfinite(u[[0, 2]]).all()
    assert (f[1] == 0).all() and np.isfinite(f).all()


def test_classical_wrong_atom_count_raises(classical):
    with pytest.raises(ValueError, match="66"):
        classical.energy(jnp.zeros((21, 3)))
    with pytest.raises(ValueError, match="22 atoms"):
        classical.engine.reduced(np.zeros((4, 21, 3)))


def test_classical_asset_forces_are_recomputable(classical):
    arrays = alanine_data.read_arrays(CLASSICAL, "val")
    u, f = classical.energies_and_forces(arrays["positions"][:16])
    np.testing.assert_allclose(u, arrays["energies"][:16], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(f, arrays["forces"][:16], rtol=1e-4, atol=2e-2)


def test_classical_asset_layout():
    meta = json.loads((CLASSICAL / "manifest.json").read_text())["ad2"]
    ds = stored_dataset(alanine.AlanineDipeptideClassical(), path=str(CLASSICAL))
    assert ds.has_forces and ds.train.positions.shape[1] == 66 and ds.train.positions.dtype == np.float32
    for name in ("train", "val", "test"):
        split = ds.split(name)
        assert len(split) == meta["splits"][name]["n"]
        centres = split.positions.reshape(len(split), 22, 3).mean(1)
        assert np.abs(centres).max() < 1e-5  # stored centred
    assert max(meta["max_abs_energy_difference_kj_mol"].values()) < 1e-2


def test_classical_asset_reads_through_the_generic_loader():
    ds = stored_dataset(alanine.AlanineDipeptideClassical(), path=str(CLASSICAL), n_test=10)
    np.testing.assert_array_equal(ds.test.positions, alanine_data.read_arrays(CLASSICAL, "test")["positions"][:10])


# ---------------------------------------------------------------------------------------
# Semi-empirical target (GFN2-xTB)


@pytest.fixture(scope="module")
def xtb():
    pytest.importorskip("tblite")
    return alanine.AlanineDipeptideXTB(n_workers=0)


def test_xtb_energy_in_kbt_by_hand(xtb, frames, x64):
    from tblite.interface import Calculator

    x = frames[0].reshape(22, 3)
    calc = Calculator("GFN2-xTB", np.array(alanine.ATOMIC_NUMBERS), x / BOHR_NM)
    calc.set("verbosity", 0)
    res = calc.singlepoint()
    hartree_kj = 2625.4996394799
    e_ref = (res.get("energy") - alanine.XTB_ENERGY_OFFSET_HARTREE) * hartree_kj / KBT_300_KJ
    f_ref = -res.get("gradient") * hartree_kj / 0.0529177210903 / KBT_300_KJ
    assert HARTREE_KJ_PER_MOL == hartree_kj
    u, f = xtb.energy_and_force(jnp.asarray(frames[0]))
    assert float(u) == pytest.approx(e_ref, rel=1e-8)
    np.testing.assert_allclose(np.asarray(f), f_ref.reshape(-1), rtol=1e-6, atol=1e-4)


def test_xtb_forces_match_finite_differences(xtb, frames, x64):
    x = jnp.asarray(frames[1])
    f = xtb.force(x)
    rng = np.random.default_rng(4)
    h = 1e-4
    for _ in range(2):
        v = jnp.asarray(rng.standard_normal(66))
        v = v / jnp.linalg.norm(v)
        fd = (xtb.energy(x + h * v) - xtb.energy(x - h * v)) / (2 * h)
        assert float(-jnp.dot(f, v)) == pytest.approx(float(fd), rel=2e-3, abs=0.05)


def test_xtb_rigid_motion(xtb, frames, x64):
    rng = np.random.default_rng(5)
    x = frames[2].reshape(22, 3)
    rot, shift = random_rotation(rng), rng.standard_normal(3)
    u_x, f_x = xtb.energy_and_force(jnp.asarray(x.reshape(-1)))
    u_y, f_y = xtb.energy_and_force(jnp.asarray((x @ rot.T + shift).reshape(-1)))
    # SCF convergence, not the physics, sets this tolerance (1e-6 k_BT ≈ 1e-9 Hartree)
    assert float(u_y) == pytest.approx(float(u_x), abs=1e-4)
    np.testing.assert_allclose(np.asarray(f_y).reshape(22, 3), np.asarray(f_x).reshape(22, 3) @ rot.T, atol=1e-2)


def test_xtb_failure_gives_inf(xtb, frames):
    x = np.array(frames[:3])
    x[0, 3:6] = x[0, 0:3]  # two atoms on top of each other: tblite refuses
    x[2, 0] = np.nan
    with pytest.warns(EngineFailureWarning, match="2 of 3"):
        u, f = xtb.energies_and_forces(x)
    assert u[0] == np.inf and u[2] == np.inf and np.isfinite(u[1])
    assert (f[[0, 2]] == 0).all()


def test_xtb_wrong_shape_raises(xtb):
    with pytest.raises(ValueError):
        xtb.energy(jnp.zeros(65))


def test_xtb_worker_pool_matches_in_process(frames):
    pytest.importorskip("tblite")
    pooled = alanine.AlanineDipeptideXTB(n_workers=2)
    here = alanine.AlanineDipeptideXTB(n_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a broken pool falls back with a warning: fail on it
        u_p, f_p = pooled.energies_and_forces(frames[:4])
    u_h, f_h = here.energies_and_forces(frames[:4])
    np.testing.assert_allclose(u_p, u_h, rtol=1e-10, atol=1e-6)
    np.testing.assert_allclose(f_p, f_h, atol=1e-4)


def test_a_process_that_used_xtb_exits_without_tracebacks():
    """tblite frees its calculators in callbacks that fail once the interpreter has torn its
    library module down; the engine lets go of its cached calculator before that."""
    import subprocess
    import sys

    pytest.importorskip("tblite")
    script = (
        "import numpy as np\n"
        "from zoo.systems import alanine\n"
        "from zoo.systems.alanine import data\n"
        "x = data.read_arrays(data.ASSET_DATA / 'ad2_xtb', 'test')['positions'][:1]\n"
        "print(alanine.AlanineDipeptideXTB(n_workers=0).energies_and_forces(x.reshape(1, -1))[0][0])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=True)
    assert np.isfinite(float(done.stdout.split()[-1]))
    assert "Exception ignored" not in done.stderr, done.stderr


@pytest.mark.parametrize("folder", [XTB, XTB_10K], ids=lambda f: f.name)
def test_xtb_asset_if_present(folder):
    if not (folder / "manifest.json").exists():
        pytest.skip(f"{folder.name} not generated yet")
    pytest.importorskip("tblite")
    ds = stored_dataset(alanine.AlanineDipeptideXTB(n_workers=0), path=str(folder))
    assert ds.train.positions.shape[1] == 66 and ds.has_forces
    if folder == XTB_10K:  # issue 19's sizes: >= 10 000 training and >= 2 000 test relaxations
        assert (len(ds.train), len(ds.val), len(ds.test)) == (10000, 1000, 2000)
    arrays = alanine_data.read_arrays(folder, "val")
    u, f = alanine.AlanineDipeptideXTB(n_workers=0).energies_and_forces(arrays["positions"][:3])
    np.testing.assert_allclose(u, arrays["energies"][:3], atol=1e-3)
    # Stored forces came from float64 positions and an SCF restarted from the previous MD
    # step; here float32 positions and a fresh SCF: components agree to ~1e-3 of the rms
    # force (≈ 300 k_BT/nm).
    np.testing.assert_allclose(f, arrays["forces"][:3], rtol=1e-3, atol=0.5)
    assert ds.has_forces


# ---------------------------------------------------------------------------------------
# Generators


class _Harmonic:
    """A stand-in engine: E = ½k‖x‖² kJ/mol per coordinate, for testing the integrator."""

    temperature = 300.0
    k = 2000.0  # kJ/(mol nm²)

    def singlepoint(self, x, restart=None):
        return 0.5 * self.k * np.sum(x**2), -self.k * x, None


def test_baoab_keeps_the_boltzmann_distribution():
    # Started in equilibrium, N(0, k_BT/k) per coordinate, BAOAB keeps the configurational
    # distribution of a harmonic well exactly (for any stable step), so the variance after
    # the run must still be k_BT/k.
    engine = _Harmonic()
    var = KBT_300_KJ / engine.k
    rng = np.random.default_rng(6)
    finals = []
    for _ in range(300):
        x0 = math.sqrt(var) * rng.standard_normal((22, 3))
        x, _, _ = alanine_data.baoab_relax(engine, x0, rng, time_fs=50, timestep_fs=2.0, friction_per_ps=20.0)
        finals.append(x)
    assert np.var(np.array(finals)) == pytest.approx(var, rel=0.04)


def test_generate_classical_short_run_resumes(tmp_path):
    pytest.importorskip("openmm")
    kw = dict(n_frames=4, chunk_frames=2, equilibration_ps=0.1, save_every_ps=0.01, log=None)
    first = alanine_data.generate_classical(tmp_path, max_chunks=1, **kw)
    assert first["chunks"] == 1 and first["frames"] == 2
    second = alanine_data.generate_classical(tmp_path, **kw)  # continues, does not redo chunk 0
    assert second["chunks"] == 2 and second["frames"] == 4
    arrays = alanine_data.collect(tmp_path)
    assert arrays["positions"].shape == (4, 22, 3)
    u, f = alanine.AlanineDipeptideClassical().energies_and_forces(arrays["positions"])
    np.testing.assert_allclose(u, arrays["energies"], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(f, arrays["forces"].reshape(4, -1), rtol=1e-3, atol=0.05)
    with pytest.raises(ValueError, match="timestep_fs"):
        alanine_data.generate_classical(tmp_path, **{**kw, "timestep_fs": 1.0})
    # an interrupted and resumed run gives the frames of an uninterrupted one
    alanine_data.generate_classical(tmp_path / "straight", **kw)
    np.testing.assert_array_equal(alanine_data.collect(tmp_path / "straight")["positions"], arrays["positions"])
    stats = alanine_data.classical_statistics(arrays)
    assert stats["n"] == 4 and -150 < stats["mean_potential_kj_mol"] < 50
    assert stats["n_blocks"] == 4 and stats["mean_potential_kj_mol_se"] > 0
    given_phi = alanine_data.classical_statistics(arrays, phi=alanine_data.phi_psi(arrays["positions"])[0])
    assert {k: v for k, v in given_phi.items() if k != "reference"} == {k: v for k, v in stats.items() if k != "reference"}


def test_a_classical_run_is_lengthened_and_a_data_set_taken_from_its_start(tmp_path):
    """n_frames is a run's length: a larger one continues the run (the frames of a run made that
    long at once), a smaller one makes the data set of each run's first frames; a run that ends in
    a short chunk is not lengthened."""
    pytest.importorskip("openmm")
    from zoo.cli import generate_data
    from zoo.storage import RunStateError

    kw = dict(chunk_frames=2, equilibration_ps=0.1, save_every_ps=0.01, log=None)
    assert alanine_data.generate_classical(tmp_path / "grown", n_frames=4, **kw)["frames"] == 4
    assert alanine_data.generate_classical(tmp_path / "grown", n_frames=6, **kw)["chunks"] == 3
    alanine_data.generate_classical(tmp_path / "straight", n_frames=6, **kw)
    grown = alanine_data.collect(tmp_path / "grown")["positions"]
    np.testing.assert_array_equal(grown, alanine_data.collect(tmp_path / "straight")["positions"])
    alanine_data.generate_classical(tmp_path / "odd", n_frames=3, **kw)
    with pytest.raises(RunStateError, match="short chunk"):
        alanine_data.generate_classical(tmp_path / "odd", n_frames=6, **kw)
    assert json.loads((tmp_path / "odd" / "progress.json").read_text())["params"]["n_frames"] == 3  # the refusal wrote nothing

    tiny = [
        "--gin_param=ad2_classical_md.chunk_frames = 5",
        "--gin_param=ad2_classical_md.equilibration_ps = 0.1",
        "--gin_param=ad2_classical_md.save_every_ps = 0.01",
        "--gin_param=ad2_classical_md.n_workers = 1",
    ]
    args = ["--gin=data_ad2_classical", f"--workdir={tmp_path / 'work'}", "--no_progress", *tiny]
    assert generate_data.main([*args, "--gin_param=ad2_classical_md.n_frames = 20", f"--gin_param=ad2_classical_md.output_dir = '{tmp_path / 'long'}'"]) == 0
    assert generate_data.main([*args, "--gin_param=ad2_classical_md.n_frames = 10", f"--gin_param=ad2_classical_md.output_dir = '{tmp_path / 'short'}'"]) == 0
    assert [alanine_data.progress(tmp_path / "work" / f"md_seed{s}")["frames"] for s in (1, 2)] == [20, 20]  # runs keep their frames
    info = json.loads((tmp_path / "short" / "manifest.json").read_text())["ad2"]
    assert info["generator"]["frames"] == 20 and info["statistics"]["n"] == 20
    short = {name: alanine_data.read_arrays(tmp_path / "short", name) for name in ("train", "val", "test")}
    long_train = alanine_data.read_arrays(tmp_path / "long", "train")
    assert list(short["train"]["source_index"]) == [*range(7), *range(10, 17)] and list(short["test"]["source_index"]) == [8, 9, 18, 19]
    np.testing.assert_array_equal(short["train"]["positions"][:7], long_train["positions"][:7])


def test_md_that_blows_up_stops_naming_the_chunk_and_keeps_the_chunks_before(tmp_path, monkeypatch):
    """A NaN energy in the second chunk (as the Reference platform gives after a blow-up, without
    an error of its own) stops the run by name before the chunk is stored; the first chunk stays,
    and the run continues from it once the cause is gone."""
    openmm = pytest.importorskip("openmm")
    import openmm.unit as unit

    kw = dict(n_frames=4, chunk_frames=2, equilibration_ps=0.1, save_every_ps=0.01, log=None)
    real = openmm.State.getPotentialEnergy
    calls = {"n": 0}

    def third_frame_nan(state):
        calls["n"] += 1
        return float("nan") * unit.kilojoule_per_mole if calls["n"] == 3 else real(state)

    monkeypatch.setattr(openmm.State, "getPotentialEnergy", third_frame_nan)
    with pytest.raises(alanine_data.SimulationError, match=r"seed 1 blew up in chunk 2/2, frame 1 of 2 \(0.03 ps into the run\).*The 1 chunks"):
        alanine_data.generate_classical(tmp_path, **kw)
    assert alanine_data.progress(tmp_path)["frames"] == 2
    monkeypatch.setattr(openmm.State, "getPotentialEnergy", real)
    assert alanine_data.generate_classical(tmp_path, **kw)["frames"] == 4
    assert np.isfinite(alanine_data.collect(tmp_path)["energies"]).all()


def test_classical_statistics_of_several_runs_blocks_and_counts_within_each():
    """Two runs back to back: entries into φ > 0 are counted within each run (the second run
    starting where the first one's last frame is not is no entry), and the block error is that
    of blocks that never straddle the runs."""
    from zoo.data.mcmc import block_mean_and_error

    phi = np.array([-2.0, -2.0, -2.0, -2.0, 1.0, 1.0, 1.0, 1.0])
    energies = np.arange(8.0)
    one = alanine_data.classical_statistics({"energies": energies}, phi=phi, n_blocks=4)
    two = alanine_data.classical_statistics({"energies": energies}, phi=phi, n_blocks=4, n_runs=2)
    assert one["phi_positive_entries"] == 1 and two["phi_positive_entries"] == 0
    assert two["n_runs"] == 2 and two["n_blocks"] == 4 and two["phi_positive_fraction"] == 0.5
    e_kj = energies * kbt_kj_per_mol(300.0)
    assert two["mean_potential_kj_mol_se"] == pytest.approx(block_mean_and_error(e_kj.reshape(2, 4), 2)[1])
    assert two["phi_positive_fraction_se"] == pytest.approx(np.std([0, 0, 1, 1], ddof=1) / 2)
    with pytest.raises(ValueError, match="3 runs of equal length"):
        alanine_data.classical_statistics({"energies": energies}, phi=phi, n_runs=3)


def test_generate_xtb_short_run_resumes(tmp_path, frames):
    pytest.importorskip("tblite")
    kw = dict(n_states=2, chunk_states=1, time_fs=4.0, timestep_fs=1.0, n_workers=0, log=None)
    assert alanine_data.generate_xtb(tmp_path, frames[:10], max_chunks=1, **kw)["chunks"] == 1
    done = alanine_data.generate_xtb(tmp_path, frames[:10], **kw)
    assert done["chunks"] == 2 and done["frames"] == 2 and done["failed"] == 0
    arrays = alanine_data.collect(tmp_path)
    u, f = alanine.AlanineDipeptideXTB(n_workers=0).energies_and_forces(arrays["positions"])
    np.testing.assert_allclose(u, arrays["energies"], atol=1e-3)
    np.testing.assert_allclose(f, arrays["forces"].reshape(2, -1), rtol=1e-3, atol=0.05)
    with pytest.raises(ValueError, match="differ"):
        alanine_data.generate_xtb(tmp_path, frames[:10], **{**kw, "time_fs": 8.0})


def test_xtb_splits_share_one_pool_of_workers_and_match_one_process(tmp_path, monkeypatch):
    """Every split's one-chunk calls run on the same two workers (started once, ~2 s saved a chunk), and
    what they relax equals the same relaxations in this process (per-state seeds)."""
    pytest.importorskip("tblite")
    started = []
    real_pool = alanine_data.xtb_pool
    monkeypatch.setattr(alanine_data, "xtb_pool", lambda n: started.append(n) or real_pool(n))
    kw = dict(sizes={"train": 3, "val": 1, "test": 1}, chunk_states=2, time_fs=2.0, log=None)
    shared = alanine_data.generate_xtb_splits(tmp_path / "pool", n_workers=2, **kw)
    assert started == [2]
    assert {k: v["frames"] for k, v in shared.items()} == {"train": 3, "val": 1, "test": 1}
    alanine_data.generate_xtb_splits(tmp_path / "here", n_workers=0, **kw)
    assert started == [2]
    for name in ("train", "val", "test"):
        a, b = alanine_data.collect(tmp_path / "pool" / name), alanine_data.collect(tmp_path / "here" / name)
        np.testing.assert_array_equal(a["source_index"], b["source_index"])
        np.testing.assert_allclose(a["positions"], b["positions"], atol=1e-6)


def test_generate_xtb_spreads_a_handed_in_pool_over_all_its_workers(tmp_path, frames, monkeypatch):
    """A pool handed in is used by all its workers whatever ``n_workers`` says: one task per state."""
    import concurrent.futures
    import threading
    import time

    threads = set()

    def fake_relax(args):  # stands in for xTB: records which worker ran it
        _engine, (index, x, _seed), _kw = args
        threads.add(threading.get_ident())
        time.sleep(0.05)
        return index, (x, 0.0, np.zeros_like(x))

    monkeypatch.setattr(alanine_data, "_relax_state", fake_relax)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        done = alanine_data.generate_xtb(tmp_path, frames[:10], n_states=6, chunk_states=6, pool=pool, log=None)
    assert done["frames"] == 6 and len(threads) == 2
    assert len(set(alanine_data.collect(tmp_path)["source_index"].tolist())) == 6


def test_phi_positive_entries_counts_transitions_not_wraps_or_recrossings():
    from zoo.systems.alanine.data import phi_positive_entries

    # −2 → 1 enters φ > 0 (once; leaving to −1 and coming back counts again); 3.1 → −3.1 → 3.1
    # is the β basin wrapping through ±π, no entry.
    phi = np.array([-2.0, -0.5, 1.0, 1.2, -1.0, 0.5, 3.1, -3.1, 3.1, -3.0])
    assert phi_positive_entries(phi) == 2
    # A whole transition between two frames (seen in our MD at 1-ps frames) is an entry.
    assert phi_positive_entries(np.array([-2.35, -2.21, 1.19, 0.97])) == 1
    # Recrossing φ = 0 without reaching the other core is one entry, not three.
    assert phi_positive_entries(np.array([-1.5, 0.6, -0.05, 0.4, -0.1, 0.9, 1.0])) == 1
    # Starting inside φ > 0 is no entry.
    assert phi_positive_entries(np.array([1.0, 0.8, 1.1])) == 0


def test_generate_data_tool_runs_the_classical_md_generator(tmp_path):
    """tools/generate-data --gin=data_ad2_classical: two seeds' runs, partial in one process,
    resumed side by side in two, then a data set with each run split in time."""
    pytest.importorskip("openmm")
    from zoo.cli import generate_data

    tiny = [
        "--gin_param=ad2_classical_md.n_frames = 10",
        "--gin_param=ad2_classical_md.chunk_frames = 5",
        "--gin_param=ad2_classical_md.equilibration_ps = 0.1",
        "--gin_param=ad2_classical_md.save_every_ps = 0.01",
        f"--gin_param=ad2_classical_md.output_dir = '{tmp_path / 'set'}'",
    ]
    args = ["--gin=data_ad2_classical", f"--workdir={tmp_path / 'work'}", "--no_progress", *tiny]
    assert generate_data.main([*args, "--max_chunks=1", "--gin_param=ad2_classical_md.n_workers = 1"]) == 0
    assert not (tmp_path / "set").exists()
    assert [alanine_data.progress(tmp_path / "work" / f"md_seed{s}")["frames"] for s in (1, 2)] == [5, 5]
    assert generate_data.main([*args, "--gin_param=ad2_classical_md.n_workers = 2"]) == 0
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    info = manifest["ad2"]
    assert {k: v["n"] for k, v in info["splits"].items()} == {"train": 14, "val": 2, "test": 4}
    assert set(info["phi_positive_entries"]) == {"all", "train", "val", "test"}
    assert info["statistics"]["n"] == 20 and info["statistics"]["n_runs"] == 2
    assert info["generator"]["frames"] == 20 and info["generator"]["n_frames_per_run"] == 10 and info["generator"]["seeds"] == [1, 2]
    assert info["simulated_ns"] == pytest.approx(2e-4)
    # each run split in time: train holds both runs' first frames, test their last
    train = alanine_data.read_arrays(tmp_path / "set", "train")
    assert list(train["source_index"]) == [*range(7), *range(10, 17)]
    assert list(alanine_data.read_arrays(tmp_path / "set", "test")["source_index"]) == [8, 9, 18, 19]
    # the seeds' runs differ, and each is its seed's run whichever process made which chunk
    seed1 = alanine_data.collect(tmp_path / "work" / "md_seed1")["positions"]
    assert not np.allclose(seed1, alanine_data.collect(tmp_path / "work" / "md_seed2")["positions"])
    kw = dict(n_frames=10, chunk_frames=5, equilibration_ps=0.1, save_every_ps=0.01, log=None)
    alanine_data.generate_classical(tmp_path / "alone", seed=1, **kw)
    np.testing.assert_array_equal(alanine_data.collect(tmp_path / "alone")["positions"], seed1)
    np.testing.assert_allclose(alanine_data.centre(seed1[:7]).reshape(7, -1), train["positions"][:7].reshape(7, -1), atol=1e-6)
    ds = stored_dataset(alanine.AlanineDipeptideClassical(), path=str(tmp_path / "set"))
    assert ds.train.positions.shape == (14, 66) and ds.train.forces is not None
    assert "All 2 runs" in (tmp_path / "set" / "README.md").read_text()
    for name in ("README.md", "operative_config.gin", "plots/ramachandran.png", "plots/energy_histogram.png"):
        assert (tmp_path / "set" / name).is_file(), name


def test_md_runs_side_by_side_do_not_wait_for_each_other(monkeypatch):
    """Each run's next chunk starts when its last one returns: a fast run does all its chunks
    while a slow one does its first; max_chunks bounds each run; a failing run's error stops all."""
    import concurrent.futures
    import threading
    import time

    from zoo.experiments import generate_ad2

    events, lock = [], threading.Lock()
    frames = {"slow": 0, "fast": 0}

    def fake_chunk(job):
        name, chunk_s = job
        if name == "broken":
            raise RuntimeError("NaN energy in chunk 3")
        time.sleep(chunk_s)
        with lock:
            frames[name] += 10
            events.append(name)
            return {"frames": frames[name]}

    monkeypatch.setattr(generate_ad2, "_run_classical", fake_chunk)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        status = generate_ad2._run_chunks([("slow", 1.0), ("fast", 0.05)], 40, None, pool)
    assert status == [{"frames": 40}, {"frames": 40}]
    assert events[:4] == ["fast"] * 4  # rounds would have interleaved them: fast, slow, fast, slow, ...
    frames.update(slow=0, fast=0)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        status = generate_ad2._run_chunks([("slow", 0.01), ("fast", 0.01)], 40, 2, pool)
    assert status == [{"frames": 20}, {"frames": 20}]
    frames.update(slow=0, fast=0)
    status = generate_ad2._run_chunks([("slow", 0.0), ("fast", 0.0)], 20, None, None)  # one process: the runs take turns
    assert status == [{"frames": 20}, {"frames": 20}]
    with concurrent.futures.ThreadPoolExecutor(2) as pool, pytest.raises(RuntimeError, match="chunk 3"):
        generate_ad2._run_chunks([("fast", 0.01), ("broken", 0.0)], 40, None, pool)


def test_generate_data_tool_runs_the_xtb_generator(tmp_path):
    pytest.importorskip("tblite")
    from zoo.cli import generate_data

    args = [
        "--gin=data_ad2_xtb",
        f"--workdir={tmp_path / 'work'}",
        "--no_progress",
        "--gin_param=ad2_xtb_relaxed.n_train = 2",
        "--gin_param=ad2_xtb_relaxed.n_val = 1",
        "--gin_param=ad2_xtb_relaxed.n_test = 1",
        "--gin_param=ad2_xtb_relaxed.time_fs = 2.0",
        "--gin_param=ad2_xtb_relaxed.chunk_states = 1",
        "--gin_param=ad2_xtb_relaxed.n_workers = 0",
        "--gin_param=ad2_xtb_relaxed.plots = False",
        f"--gin_param=ad2_xtb_relaxed.output_dir = '{tmp_path / 'set'}'",
    ]
    assert generate_data.main([*args, "--max_chunks=1"]) == 0  # one state per split: train incomplete
    assert not (tmp_path / "set").exists()
    assert generate_data.main([*args, "--gin_param=ad2_classical_md.n_workers = 2"]) == 0
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    assert {k: v["n"] for k, v in manifest["ad2"]["splits"].items()} == {"train": 2, "val": 1, "test": 1}
    assert manifest["system"]["name"] == "AlanineDipeptideXTB"
    x = alanine_data.read_arrays(tmp_path / "set", "train")
    u, _ = alanine.AlanineDipeptideXTB(n_workers=0).energies_and_forces(x["positions"])
    np.testing.assert_allclose(u, x["energies"], atol=1e-3)


@pytest.mark.parametrize("fmt", ["pdb", "dcd", "h5"])
def test_samples_are_written_as_trajectories_mdtraj_reads_back(fmt, tmp_path):
    """tools/sample --format=pdb|dcd|h5: an mdtraj trajectory in the shipped topology (nm), folded
    onto L, with log q and log weights in an .npz beside it."""
    pytest.importorskip("openmm")
    import mdtraj

    from zoo.boltzmann import draw_samples, save_samples

    system = alanine.AlanineDipeptideClassical()
    samples = draw_samples(_tiny_flow("egnn"), system, 6, seed=2)
    files = save_samples(samples, system, tmp_path / f"s.{fmt}")
    assert [f.name for f in files] == [f"s.{fmt}", "s.npz"]
    kwargs = {} if fmt in ("pdb", "h5") else {"top": str(alanine.PDB_PATH)}
    trajectory = mdtraj.load(str(files[0]), **kwargs)
    assert trajectory.n_frames == 6 and trajectory.n_atoms == 22
    assert [a.name for a in trajectory.topology.atoms] == [a.name for a in alanine.topology().atoms]
    # PDB stores Å with three decimals (1e-4 nm); DCD single precision; HDF5 exact float32.
    np.testing.assert_allclose(trajectory.xyz, samples["x"], atol=2e-4 if fmt == "pdb" else 1e-5)
    assert np.all(alanine.handedness(trajectory.xyz.reshape(6, 66)) == alanine.l_handedness())
    beside = np.load(files[1])
    assert sorted(beside.files) == ["energy", "log_q", "log_w", "path_length"]
    np.testing.assert_array_equal(beside["log_w"], samples["log_w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f in files)  # no temporary left


def test_particle_samples_go_to_npy_and_have_no_trajectory(tmp_path, capsys):
    from zoo.boltzmann import save_samples
    from zoo.experiments.config import ConfigError
    from zoo.systems import DoubleWell

    system = DoubleWell()
    samples = {"x": np.ones((3, 4, 2), np.float32), "log_q": np.zeros(3), "energy": np.zeros(3), "log_w": np.zeros(3), "path_length": np.ones(3)}
    files = save_samples(samples, system, tmp_path / "s.npy")
    np.testing.assert_array_equal(np.load(files[0]), samples["x"])
    assert files[1].name == "s.npz" and "x" not in np.load(files[1]).files
    with pytest.raises(ConfigError, match="DoubleWell has no molecular topology, so no pdb trajectory"):
        save_samples(samples, system, tmp_path / "s.pdb")
    with pytest.raises(ConfigError, match="unknown sample format 'xyz'"):
        save_samples(samples, system, tmp_path / "s.npz", format="xyz")
