"""Stored data sets: exact round trip, manifest checks, clear errors, the generator and the shipped sets."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from zoo import storage
from zoo.data import load_dataset, stored_dataset
from zoo.resources import ROOT as REPO_ROOT
from zoo.storage import DatasetError
from zoo.systems import DoubleWell, LennardJones


def _random_splits(system, counts=(30, 10, 20), seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name, n in zip(("train", "val", "test"), counts):
        pos = rng.standard_normal((n, *system.event_shape)).astype(np.float32)
        out[name] = (pos, rng.standard_normal(pos.shape).astype(np.float32))
    return out


@pytest.fixture
def dw_store(tmp_path):
    dw = DoubleWell()
    splits = _random_splits(dw)
    manifest = storage.write_dataset(tmp_path / "dw", splits, system=dw, extra={"seed": 3})
    return dw, splits, tmp_path / "dw", manifest


def test_round_trip_is_exact(dw_store):
    dw, splits, path, manifest = dw_store
    assert manifest["splits"]["train"]["count"] == 30
    assert manifest["seed"] == 3
    for name, (pos, frc) in splits.items():
        p, f = load_dataset(path, name)
        assert p.dtype == np.float32 and p.shape == (len(pos), 4, 2)
        np.testing.assert_array_equal(p, pos)
        np.testing.assert_array_equal(f, frc)
    # The recorded hashes can be checked with numpy alone.
    import hashlib

    test_pos = splits["test"][0]
    assert manifest["splits"]["test"]["arrays"]["positions"]["sha256"] == hashlib.sha256(test_pos.astype("<f4").tobytes()).hexdigest()


def test_integer_arrays_stay_exact_and_float_arrays_stay_float32(tmp_path):
    """Frame indices past 2**24 (a 4-seed, 5 M-frame MD set) would round in float32."""
    index = np.array([0, 2**24 + 1, 5 * 10**6 * 4 - 1])
    storage.write_array(tmp_path / "index", index)
    back = storage.read_array(tmp_path / "index")
    assert back.dtype == np.int64 and back.tolist() == index.tolist()
    storage.write_array(tmp_path / "energies", np.array([1.5, -2.25], np.float64))
    assert storage.read_array(tmp_path / "energies").dtype == np.float32
    # Positions are float32 whatever the caller's type.
    dw = DoubleWell()
    positions = np.arange(3 * 8).reshape(3, 4, 2)
    storage.write_dataset(tmp_path / "ints", {"train": (positions, None), "val": (positions, None), "test": (positions, None)}, system=dw)
    p, _ = load_dataset(tmp_path / "ints", "test")
    assert p.dtype == np.float32 and np.array_equal(p, positions)


def test_stored_dataset_gives_flat_splits_and_subsets(dw_store):
    dw, splits, path, _ = dw_store
    data = stored_dataset(dw, path=str(path))
    assert data.train.positions.shape == (30, 8) and data.test.forces.shape == (20, 8)
    np.testing.assert_array_equal(data.val.positions, splits["val"][0].reshape(10, 8))
    data.validate(dw.dim)
    sub = stored_dataset(dw, path=path, n_train=5, n_test=7)
    assert (len(sub.train), len(sub.val), len(sub.test)) == (5, 10, 7)
    with pytest.raises(ValueError, match="n_train=31"):
        stored_dataset(dw, path=path, n_train=31)


def test_wrong_system_is_refused(dw_store):
    _, _, path, _ = dw_store
    with pytest.raises(DatasetError, match="DoubleWell.*LennardJones"):
        stored_dataset(LennardJones(n_particles=4, spatial_dim=2), path=path)
    with pytest.raises(DatasetError, match="d0: stored 4.0, configured 3.0"):
        stored_dataset(DoubleWell(d0=3.0), path=path)


def test_corrupt_or_missing_array_is_reported(dw_store):
    dw, _, path, _ = dw_store
    chunk = next(p for p in (path / "train" / "positions").iterdir() if not p.name.startswith("."))
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match="train/positions"):
        stored_dataset(dw, path=path)
    # Other splits are still readable.
    load_dataset(path, "test")
    # A removed chunk would read back as zeros: the hash catches it.
    chunk.unlink()
    with pytest.raises(DatasetError, match="sha256"):
        load_dataset(path, "train")
    shutil.rmtree(path / "val" / "forces")
    with pytest.raises(DatasetError, match="val/forces is missing"):
        load_dataset(path, "val")


def test_missing_or_corrupt_manifest(dw_store, tmp_path):
    dw, _, path, _ = dw_store
    with pytest.raises(DatasetError, match="does not exist"):
        stored_dataset(dw, path=tmp_path / "nowhere")
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="corrupt"):
        load_dataset(path)
    (path / "manifest.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(DatasetError, match="not a zoo-dataset manifest"):
        load_dataset(path)
    with pytest.raises(ValueError, match="unknown split"):
        load_dataset(path, "training")


def test_rewrite_replaces_the_old_set_and_rejects_nan(dw_store):
    dw, _, path, _ = dw_store
    new = _random_splits(dw, counts=(3, 2, 1), seed=1)
    storage.write_dataset(path, new, system=dw)
    assert load_dataset(path, "train")[0].shape == (3, 4, 2)
    bad = {"train": (np.full((2, 4, 2), np.nan, np.float32), None)}
    with pytest.raises(ValueError, match="NaN"):
        storage.write_dataset(path, bad, system=dw)
    assert load_dataset(path, "train")[0].shape == (3, 4, 2)  # the old set survives a failed write
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".dw")]


def test_a_folder_that_is_not_a_data_set_is_never_replaced(tmp_path):
    dw = DoubleWell()
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "precious.txt").write_text("keep")
    with pytest.raises(DatasetError, match="refusing to replace"):
        storage.write_dataset(tmp_path / "work", _random_splits(dw), system=dw)
    assert (tmp_path / "work" / "precious.txt").read_text() == "keep"


def test_registered_as_dataset():
    from zoo.experiments.registry import lookup

    assert lookup("stored_dataset").kind == "dataset"


@pytest.mark.slow  # ~30 s on a busy 2-core machine, almost all of it compiling
def test_generate_data_cli_end_to_end(tmp_path, monkeypatch):
    """The tool on a tiny DW4 run: data, manifest, plots, operative config, resumable."""
    from zoo.cli.generate_data import main

    args = [
        "--gin=data_dw4",
        f"--workdir={tmp_path / 'work'}",
        f"--gin_param=generate_data.output_dir='{tmp_path / 'out'}'",
        "--gin_param=generate_data.n_chains=8",
        "--gin_param=generate_data.burn_in=40",
        "--gin_param=generate_data.thin=5",
        "--gin_param=generate_data.chunk_steps=20",
        "--gin_param=generate_data.hmc_steps=3",
        "--gin_param=generate_data.n_train=20",
        "--gin_param=generate_data.n_val=6",
        "--gin_param=generate_data.n_test=10",
        "--no_progress",
    ]
    assert main([*args, "--max_chunks=2"]) == 0
    assert not (tmp_path / "out").exists()
    assert main(args) == 0
    out = tmp_path / "out"
    manifest = storage.read_manifest(out)
    assert {k: v["count"] for k, v in manifest["splits"].items()} == {"train": 20, "val": 6, "test": 10}
    assert manifest["sampler"]["kernel"] == "hmc" and "rhat_energy" in manifest["diagnostics"]
    assert manifest["statistics"]["test"]["virial"]["expected"] == 6.0
    for name in ("energy_histogram.png", "pair_distance_histogram.png", "energy_trace.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    assert "generate_data.n_chains = 8" in (tmp_path / "work" / "operative_config.gin").read_text()
    assert "DoubleWell" in (out / "operative_config.gin").read_text()
    data = stored_dataset(DoubleWell(), path=out)
    assert data.train.positions.shape == (20, 8)
    # Forces are −∇u of the stored positions.
    import jax

    np.testing.assert_allclose(data.test.forces, np.asarray(jax.vmap(DoubleWell().force)(data.test.positions)), rtol=1e-5, atol=1e-4)


def test_unknown_gin_file_is_a_clear_error(tmp_path, capsys):
    from zoo.cli.generate_data import main

    with pytest.raises(SystemExit) as stop:
        main(["--gin=data_nothing", f"--workdir={tmp_path}"])
    assert stop.value.code == 2
    assert "data_nothing" in capsys.readouterr().err


# ---------------------------------------------------------------------------- shipped data sets
SHIPPED = REPO_ROOT / "assets" / "data"


@pytest.mark.skipif(not (SHIPPED / "lj13" / "manifest.json").exists(), reason="LJ13 data set not generated")
def test_shipped_lj13_matches_published_statistics(tmp_path, monkeypatch):
    from zoo.experiments.generate import statistics

    monkeypatch.chdir(tmp_path)  # the relative path resolves against the repository root
    lj = LennardJones()
    data = stored_dataset(lj, path="assets/data/lj13")
    assert len(data.test) >= 10_000 and len(data.train) >= 10_000 and len(data.val) > 0
    stats = statistics(lj, data.test.positions, data.test.forces)
    assert stats["energy"]["mean"] == pytest.approx(-43.1, abs=0.3)
    assert stats["energy"]["std"] == pytest.approx(7.0, abs=0.3)
    assert stats["pair_part_unordered"]["mean"] == pytest.approx(-26.1, abs=0.2)
    assert stats["oscillator_part"]["mean"] == pytest.approx(9.0, abs=0.1)
    # x·∇u has a std of ≈ 59 (the r⁻¹² terms), so 10⁴ samples pin its mean to ±1.6 % only.
    virial = stats["virial"]
    assert abs(virial["mean"] - 36.0) < 3 * virial["se"]
    assert stats["centre_of_mass_max_abs"] < 1e-4


@pytest.mark.skipif(not (SHIPPED / "dw4" / "manifest.json").exists(), reason="DW4 data set not generated")
def test_shipped_dw4_is_bimodal_and_satisfies_virial():
    from zoo.experiments.generate import statistics

    dw = DoubleWell()
    data = stored_dataset(dw, path=SHIPPED / "dw4")
    assert len(data.test) >= 10_000
    stats = statistics(dw, data.test.positions, data.test.forces)
    short, long = stats["distance_modes"]
    assert 2.0 < short < 3.0 and 5.0 < long < 6.0
    assert 0.3 < stats["fraction_pair_distances_below_d0"] < 0.7
    virial = stats["virial"]  # std ≈ 37 for a mean of 6: a 3-se test, not a 1 % one
    assert abs(virial["mean"] - 6.0) < 3 * virial["se"]


def test_paths_are_not_resolved_against_repo_when_they_exist(tmp_path, monkeypatch):
    from zoo.data import resolve_data_path

    monkeypatch.chdir(tmp_path)
    os.makedirs("assets/data/x")
    assert resolve_data_path("assets/data/x") == Path("assets/data/x")
    assert resolve_data_path("gin") == REPO_ROOT / "gin"


def test_positions_in_a_scrambled_layout_are_refused(tmp_path):
    """(n, d, N) for particles stored (n, N, d) has the right size but would scramble coordinates:
    refused with both shapes named; (n, N, d) and (n, N·d) are accepted."""
    dw = DoubleWell()
    pos = np.random.default_rng(0).standard_normal((10, 4, 2)).astype(np.float32)
    with pytest.raises(ValueError, match=r"train positions have shape \(10, 2, 4\); expected \(n, 4, 2\) or \(n, 8\)"):
        storage.write_dataset(tmp_path / "bad", {"train": (pos.transpose(0, 2, 1), None)}, system=dw)
    assert not (tmp_path / "bad").exists()
    for layout in (pos, pos.reshape(10, 8)):
        storage.write_dataset(tmp_path / "ok", {"train": (layout, None)}, system=dw)
        np.testing.assert_array_equal(load_dataset(tmp_path / "ok", "train")[0], pos)


def test_every_door_for_positions_refuses_a_scrambled_layout():
    """In memory (make_split with the system's event shape), in a flow's log density and in
    an energy: (n, d, N) is an error naming the shapes, never reshaped."""
    from zoo.data import make_split
    from zoo.fields import MLPField
    from zoo.flows import CNF, StandardNormal
    from zoo.flows.cnf import log_prob_chunked

    dw = DoubleWell()
    pos = np.random.default_rng(0).standard_normal((10, 4, 2)).astype(np.float32)
    forces = -pos
    with pytest.raises(DatasetError, match=r"positions have shape \(10, 2, 4\); expected \(n, 4, 2\) or \(n, 8\)"):
        make_split(pos.transpose(0, 2, 1), event_shape=dw.event_shape)
    with pytest.raises(DatasetError, match=r"forces have shape \(10, 2, 4\)"):
        make_split(pos, forces.transpose(0, 2, 1), event_shape=dw.event_shape)
    with pytest.raises(DatasetError, match="5 forces for 10 positions"):
        make_split(pos, forces[:5], event_shape=dw.event_shape)
    for layout in (pos, pos.reshape(10, 8)):
        split = make_split(layout, forces, event_shape=dw.event_shape)
        np.testing.assert_array_equal(split.positions, pos.reshape(10, 8))
        np.testing.assert_array_equal(split.forces, forces.reshape(10, 8))
    flow = CNF(MLPField(8, key=jax.random.PRNGKey(0)), StandardNormal(8), n_steps=2)
    with pytest.raises(ValueError, match=r"shape \(n, 8\), got \(10, 2, 4\)"):
        log_prob_chunked(flow, pos.transpose(0, 2, 1))
    with pytest.raises(ValueError, match=r"\(8,\) or \(4, 2\), got \(2, 4\)"):
        dw.energy(pos[0].T)


def test_chunk_log_keeps_order_settings_and_refuses_what_it_cannot_continue(tmp_path):
    from zoo.storage import ChunkLog, RunStateError

    log = ChunkLog(tmp_path, {"seed": 1, "sizes": (2, 3)})
    log.append({"a": np.arange(2)}, seconds=1.5)
    log.append({"a": np.arange(2, 5)}, seconds=0.5, failed=[7])
    again = ChunkLog(tmp_path, {"seed": 1, "sizes": [2, 3]})  # tuples are stored as JSON lists
    assert again.n_chunks == 2 and again.seconds == 2.0 and again.manifest["failed"] == [7]
    np.testing.assert_array_equal(again.concatenate(["a", "missing"])["a"], np.arange(5))
    # A prefix reads only the chunks that hold it: with the second chunk unreadable, the first 2 still come back.
    second = tmp_path / again.manifest["chunks"][1]
    kept = second.read_bytes()
    second.write_bytes(b"not an npz")
    np.testing.assert_array_equal(again.concatenate(["a"], length=2)["a"], np.arange(2))
    with pytest.raises(RunStateError, match="cannot read"):
        again.concatenate(["a"], length=3)
    second.write_bytes(kept)
    np.testing.assert_array_equal(again.concatenate(["a"], length=4)["a"], np.arange(4))
    np.testing.assert_array_equal(again.concatenate(["a"], length=9)["a"], np.arange(5))  # a run shorter than asked: all of it
    np.testing.assert_array_equal(again.load(-1)["a"], np.arange(2, 5))
    log.append({"a": np.arange(1), "b": np.zeros(3)}, seconds=0.0)
    assert set(ChunkLog.existing(tmp_path).load(-1, ("b", "missing"))) == {"b"}  # only the fields asked for
    with pytest.raises(RunStateError, match="seed differ"):
        ChunkLog(tmp_path, {"seed": 2, "sizes": [2, 3]})
    assert ChunkLog.existing(tmp_path).manifest["params"] == {"seed": 1, "sizes": [2, 3]}
    (tmp_path / "chunk_00001.npz").write_bytes(b"not an npz")
    with pytest.raises(RunStateError, match="chunk_00001.npz"):
        again.load(1)
    (tmp_path / ChunkLog.MANIFEST).write_text("{")
    with pytest.raises(RunStateError, match="cannot read"):
        ChunkLog(tmp_path, {"seed": 1, "sizes": [2, 3]})
    fresh = ChunkLog(tmp_path, {"seed": 2}, resume=False)  # starts over: no chunk of the old run is left
    assert fresh.n_chunks == 0 and not list(tmp_path.glob("chunk_*.npz"))
    with pytest.raises(RunStateError, match="no chunked run"):
        ChunkLog.existing(tmp_path / "elsewhere")


def test_a_chunk_log_has_one_writer_process(tmp_path):
    """A run another process writes is refused to a second writer, by name, before anything is
    removed (resume=False would delete the other's chunks); it can still be read, and once the
    writer is gone (or has closed it) the run continues."""
    import subprocess
    import sys

    from zoo.storage import ChunkLog, RunStateError

    log = ChunkLog(tmp_path, {"seed": 1})
    log.append({"a": np.arange(2)}, seconds=1.0)
    log.close()
    holder = "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path / ChunkLog.WRITER_LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        for resume in (True, False):
            with pytest.raises(RunStateError, match="another process is writing"):
                ChunkLog(tmp_path, {"seed": 1}, resume=resume)
        assert ChunkLog.existing(tmp_path).n_chunks == 1 and (tmp_path / "chunk_00000.npz").is_file()
    finally:
        proc.kill()
        proc.wait()
    again = ChunkLog(tmp_path, {"seed": 1})
    assert again.n_chunks == 1
    ChunkLog(tmp_path, {"seed": 1}).close()  # re-entrant within a process; close gives it up
    again.append({"a": np.arange(1)}, seconds=0.0)
    assert ChunkLog.existing(tmp_path).n_chunks == 2


def test_exclusive_waits_for_the_other_holder_and_lets_go_after(tmp_path):
    """storage.exclusive: while one holder is inside, another process cannot take the lock;
    after the block (or an error in it) it can."""
    import subprocess
    import sys

    from zoo.storage import exclusive

    lock = tmp_path / ".lock"
    probe = "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\ntry:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')\nexcept BlockingIOError:\n    print('held')"

    def other_process_sees():
        return subprocess.run([sys.executable, "-c", probe, str(lock)], capture_output=True, text=True, check=True).stdout.strip()

    with exclusive(lock):
        assert other_process_sees() == "held"
    assert other_process_sees() == "free"
    with pytest.raises(RuntimeError), exclusive(lock):
        raise RuntimeError("inside")
    assert other_process_sees() == "free"
