"""Published data in: flat .npy coordinate arrays (the equivariant-flow-matching DW4/LJ13 sets)
and mdtraj trajectories, checked (shape, units, atom order, centring) and given forces."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.data import DatasetError, stored_dataset
from zoo.data.importing import read_positions
from zoo.systems import DoubleWell, LennardJones


def _lj13_published(tmp_path, n=40, seed=0):
    """LJ13 configurations as the EFM sets ship them: flat (n, 39), here also off-centre."""
    shipped = stored_dataset(LennardJones(n_particles=13), path="assets/data/lj13", n_train=n, n_val=n, n_test=n)
    x = shipped.test.positions.reshape(n, 13, 3) + np.random.default_rng(seed).normal(size=(n, 1, 3)).astype(np.float32)
    path = tmp_path / "lj13_test.npy"
    np.save(path, x.reshape(n, 39))
    return path, x


def test_lj13_npy_imports_centred_with_forces_from_the_energy(tmp_path, capsys):
    from zoo.cli import import_data

    path, x = _lj13_published(tmp_path)
    import_data.main(["--gin=lj13_common.gin", f"--train={path}", f"--val={path}", f"--test={path}", f"--out={tmp_path / 'ds'}"])
    out = capsys.readouterr().out
    assert "test 40" in out and "centred (largest centre-of-mass offset" in out
    system = LennardJones(n_particles=13)
    ds = stored_dataset(system, path=str(tmp_path / "ds"))
    centred = x - x.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(ds.test.positions, centred.reshape(40, 39), atol=1e-5)
    # Forces: an independent gradient of the same energy.
    want = -np.asarray(jax.vmap(jax.grad(system.energy))(jnp.asarray(centred.reshape(40, 39))))
    np.testing.assert_allclose(ds.test.forces, want, rtol=1e-4, atol=1e-3)
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["imported"]["test"]["file"] == str(path) and manifest["imported"]["test"]["max_centre_of_mass_offset"] > 0.1


def test_bad_arrays_are_refused_by_name(tmp_path):
    system = LennardJones(n_particles=13)
    path, x = _lj13_published(tmp_path, n=5)
    np.save(tmp_path / "scrambled.npy", x.transpose(0, 2, 1))
    with pytest.raises(DatasetError, match=r"shape \(5, 3, 13\); expected \(n, 13, 3\) or \(n, 39\)"):
        read_positions(tmp_path / "scrambled.npy", system)
    nan = x.copy()
    nan[2, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(DatasetError, match="1 of 5 configurations contain NaN"):
        read_positions(tmp_path / "nan.npy", system)
    with pytest.raises(DatasetError, match="no file"):
        read_positions(tmp_path / "absent.npy", system)


def test_an_imported_dw4_file_evaluates_through_the_gin_data_source(tmp_path):
    """make_dataset.dataset = @imported_dataset: a released model evaluated on published-format files."""
    from zoo.cli import evaluate

    system = DoubleWell()
    x = np.asarray(stored_dataset(system, path="assets/data/dw4", n_train=16, n_val=16, n_test=16).test.positions)
    np.save(tmp_path / "dw4.npy", x)
    f = tmp_path / "dw4.npy"
    evaluate.main(
        ["dw4_eqotfm_pg", f"--workdir={tmp_path / 'e'}", "--no_progress", "--gin_param=make_dataset.dataset = @imported_dataset",
         f"--gin_param=imported_dataset.train = '{f}'", f"--gin_param=imported_dataset.val = '{f}'", f"--gin_param=imported_dataset.test = '{f}'",
         "--gin_param=evaluation.n_samples = 16", "--gin_param=evaluation.n_target = 16"]  # fmt: skip
    )
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["n_samples_p"] == 16 and np.isfinite(metrics["nll"]) and metrics["nll"] < 12.0


def test_trajectories_and_molecular_arrays_with_their_units_and_atom_order(tmp_path):
    pytest.importorskip("openmm")
    import mdtraj

    from zoo.data.importing import import_splits
    from zoo.systems import alanine

    system = alanine.AlanineDipeptideClassical()
    reference = mdtraj.load(str(alanine.PDB_PATH))
    frames = reference.xyz + np.random.default_rng(0).normal(scale=0.002, size=(4, 22, 3)).astype(np.float32)
    trajectory = mdtraj.Trajectory(frames, reference.topology)
    trajectory.save_dcd(str(tmp_path / "t.dcd"))
    x, report = read_positions(tmp_path / "t.dcd", system, topology=alanine.PDB_PATH)
    centred = frames - frames.mean(axis=1, keepdims=True)  # flows live on the centre-of-mass-free subspace
    np.testing.assert_allclose(x, centred, atol=1e-4)  # DCD stores Å in single precision
    assert report["length_unit"] == "nm (mdtraj)" and report["count"] == 4
    np.save(tmp_path / "angstrom.npy", 10.0 * frames)
    x_a, _ = read_positions(tmp_path / "angstrom.npy", system, length_unit="angstrom")
    np.testing.assert_allclose(x_a, centred, atol=1e-6)
    with pytest.raises(DatasetError, match="declare its length unit"):
        read_positions(tmp_path / "angstrom.npy", system)
    with pytest.raises(DatasetError, match="need a topology file"):
        read_positions(tmp_path / "t.dcd", system)
    # The same atoms in another order: the first mismatch is named.
    lines = alanine.PDB_PATH.read_text().splitlines()
    atoms = [i for i, line in enumerate(lines) if line.startswith(("ATOM", "HETATM"))]
    lines[atoms[0]], lines[atoms[1]] = lines[atoms[1]], lines[atoms[0]]
    (tmp_path / "swapped.pdb").write_text("\n".join(line for line in lines if not line.startswith("CONECT")) + "\n")
    with pytest.raises(DatasetError, match=r"atom 0 is C 'CH3' but AlanineDipeptideClassical expects H '"):
        read_positions(tmp_path / "swapped.pdb", system)
    splits, _ = import_splits(system, {"test": tmp_path / "t.dcd"}, topology=alanine.PDB_PATH)
    u, f = system.energies_and_forces(splits["test"][0].reshape(4, 66))
    np.testing.assert_allclose(splits["test"][1].reshape(4, 66), f, rtol=1e-5)


@pytest.mark.slow
def test_a_published_lj13_npy_and_an_ad2_trajectory_evaluate_released_models(tmp_path):
    """The issue's end-to-end case: files as published, evaluated by released models through
    make_dataset.dataset = @imported_dataset (8 samples each; exact LJ13 divergence)."""
    pytest.importorskip("openmm")
    import mdtraj

    from zoo.cli import evaluate
    from zoo.systems import alanine

    lj13, _ = _lj13_published(tmp_path, n=8)
    ad2 = stored_dataset(alanine.AlanineDipeptideClassical(), path="assets/data/ad2_classical", n_train=8, n_val=8, n_test=8)
    dcd = tmp_path / "ad2.dcd"
    mdtraj.Trajectory(ad2.test.positions.reshape(8, 22, 3), alanine.topology()).save_dcd(str(dcd))
    for name, f, extra in (("lj13_otfm_pg", lj13, []), ("ad2_classical_fm", dcd, [f"--gin_param=imported_dataset.topology = '{alanine.PDB_PATH}'"])):
        evaluate.main(
            [name, f"--workdir={tmp_path / name}", "--no_progress", "--gin_param=make_dataset.dataset = @imported_dataset",
             f"--gin_param=imported_dataset.train = '{f}'", f"--gin_param=imported_dataset.val = '{f}'", f"--gin_param=imported_dataset.test = '{f}'",
             "--gin_param=evaluation.n_samples = 8", "--gin_param=evaluation.n_target = 8", *extra]  # fmt: skip
        )
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["n_samples_p"] == 8 and np.isfinite(metrics["nll"]), name
