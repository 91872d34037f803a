"""Checkpoints: bit-identical round trips, LATEST and pruning, damage detection, crashes, archives."""

import os
import subprocess
import sys
import tarfile
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import zoo
from zoo import checkpoint as ck
from zoo.flows import FixedStep


def _cnf(key, width=64):
    return zoo.flows.CNF(zoo.fields.MLPField(2, width=width, key=key), zoo.flows.StandardNormal(2))


def _optimizer():
    # apply_if_finite adds bool and int32 scalars to adam's state.
    return optax.apply_if_finite(optax.adam(1e-3), max_consecutive_errors=3)


def _trained_state(model, steps=3):
    """Take a few adam steps so mu, nu and the counts are non-trivial."""
    opt = _optimizer()
    params, static = eqx.partition(model, eqx.is_array)
    state = opt.init(params)
    x = jax.random.normal(jax.random.key(3), (8, 2))

    @eqx.filter_jit
    def step(params, state):
        def loss(p):
            m = eqx.combine(p, static)
            return jnp.mean(jax.vmap(lambda xi: m.field(0.3, xi))(x) ** 2)

        updates, state = opt.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return eqx.combine(params, static), state


@pytest.fixture(scope="module")
def trained():
    model, state = _trained_state(_cnf(jax.random.key(0)))
    return model, state, jax.random.key(7)


def _leaves(tree):
    return jax.tree_util.tree_flatten_with_path(eqx.filter(tree, eqx.is_array))[0]


def _assert_bit_identical(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert [jax.tree_util.keystr(p) for p, _ in la] == [jax.tree_util.keystr(p) for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert str(x.dtype) == str(y.dtype)
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)


def _fresh_template():
    model = _cnf(jax.random.key(99))  # different weights, same architecture
    return model, _optimizer().init(eqx.filter(model, eqx.is_array))


def _chunk_file(step_dir, leaf_dir):
    d = step_dir / "arrays" / "model" / leaf_dir
    (chunk,) = [p for p in d.iterdir() if not p.name.startswith(".")]
    return chunk


# ---------------------------------------------------------------------------- round trips
def test_round_trip_is_bit_identical(tmp_path, trained):
    model, state, key = trained
    path = ck.save_checkpoint(
        tmp_path, step=12, model=model, opt_state=state, key=key, config="x = 1\n", metadata={"data": "abc"}
    )
    assert path == tmp_path / "step_00000012"
    model_like, state_like = _fresh_template()
    out = ck.load_checkpoint(tmp_path, model_like=model_like, opt_state_like=state_like)
    _assert_bit_identical(out.model, model)
    _assert_bit_identical(out.opt_state, state)
    _assert_bit_identical(out.key, key)
    assert out.step == 12 and out.config == "x = 1\n" and out.metadata == {"data": "abc"}
    assert out.zoo_version == zoo.__version__
    # Static parts come from the template and the restored model computes what the saved one does.
    x = jnp.array([[0.3, -1.2], [2.0, 0.5]])
    for m in (out.model, model):
        assert m.solver == FixedStep("rk4", n_steps=15)
    np.testing.assert_array_equal(
        jax.vmap(lambda xi: out.model.field(0.3, xi))(x), jax.vmap(lambda xi: model.field(0.3, xi))(x)
    )
    np.testing.assert_array_equal(jax.vmap(out.model.base.log_prob)(x), jax.vmap(model.base.log_prob)(x))
    # The restored optimiser state continues training exactly as the original would.
    grads = eqx.filter(model, eqx.is_array)
    u1, _ = _optimizer().update(grads, state, eqx.filter(model, eqx.is_array))
    u2, _ = _optimizer().update(grads, out.opt_state, eqx.filter(out.model, eqx.is_array))
    _assert_bit_identical(u1, u2)


def test_raw_key_and_shape_only_template(tmp_path, trained):
    model, _, _ = trained
    raw = jax.random.PRNGKey(5)
    ck.save_checkpoint(tmp_path, step=0, model=model, key=raw)
    out = ck.load_checkpoint(tmp_path, model_like=eqx.filter_eval_shape(_cnf, jax.random.key(0)))
    _assert_bit_identical(out.model, model)
    assert out.key.dtype == jnp.uint32
    np.testing.assert_array_equal(out.key, raw)
    assert out.opt_state is None


def test_round_trip_of_dtypes_and_zero_d_arrays(tmp_path):
    with jax.enable_x64(True):
        tree = {
            "f64": jnp.array([1 / 3, -0.0, np.nan, np.inf]),
            "f32": jnp.asarray(np.float32(np.pi)),  # 0-d
            "i64": jnp.array([[-(2**40), 7]], dtype=jnp.int64),
            "u32": jnp.array([2**32 - 1], dtype=jnp.uint32),
            "flag": jnp.array(True),
            "bf16": jnp.array([1.5, -2.25], dtype=jnp.bfloat16),
            "empty": jnp.zeros((0, 3)),
            "np": np.arange(3, dtype=np.int16),
            "typed_keys": jax.random.split(jax.random.key(0, impl="rbg"), 3),
            "static": "not an array",
        }
        ck.save_checkpoint(tmp_path, step=1, model=tree)
        out = ck.load_checkpoint(tmp_path, model_like=tree).model
        _assert_bit_identical(out, tree)
        assert isinstance(out["np"], np.ndarray) and out["static"] == "not an array"
        assert out["f32"].shape == () and jax.random.key_impl(out["typed_keys"]) == jax.random.key_impl(
            tree["typed_keys"]
        )


# ---------------------------------------------------------------------------- LATEST and pruning
def test_latest_points_to_newest_and_keep_prunes(tmp_path, trained):
    model, state, key = trained
    assert ck.latest_checkpoint(tmp_path) is None
    for step in (10, 20, 30, 40, 50):
        path = ck.save_checkpoint(tmp_path, step=step, model=model, opt_state=state, keep=2)
        assert (tmp_path / "LATEST").read_text() == f"{path.name}\n"
        assert ck.latest_checkpoint(tmp_path) == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "step_00000040", "step_00000050"]
    assert ck.read_checkpoint_info(tmp_path).step == 50
    # A step dir can be loaded directly, LATEST notwithstanding.
    assert ck.load_checkpoint(tmp_path / "step_00000040", model_like=model).step == 40
    # keep=None keeps everything; saving an existing step replaces it.
    ck.save_checkpoint(tmp_path, step=40, model=model, keep=None, metadata={"again": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "step_00000040", "step_00000050"]
    assert ck.latest_checkpoint(tmp_path).name == "step_00000040"
    assert ck.read_checkpoint_info(tmp_path).metadata == {"again": True}


def test_missing_latest_falls_back_to_largest_step(tmp_path, trained):
    model, _, _ = trained
    for step in (3, 1):
        ck.save_checkpoint(tmp_path, step=step, model=model)
    (tmp_path / "LATEST").unlink()
    assert ck.latest_checkpoint(tmp_path).name == "step_00000003"
    with pytest.raises(ck.CheckpointNotFoundError):
        ck.load_checkpoint(tmp_path / "nowhere", model_like=model)
    with pytest.raises(ck.CheckpointNotFoundError):
        ck.load_checkpoint(tmp_path / "step_00000003" / "arrays" / "key", model_like=model)


def test_info_without_template(tmp_path, trained):
    model, state, key = trained
    config = "CNF.solver = 'rk4'\nMLPField.width = 64\n"
    ck.save_checkpoint(tmp_path, step=7, model=model, key=key, config=config, metadata={"loss": np.float32(0.5)})
    info = ck.read_checkpoint_info(tmp_path)
    assert (info.step, info.config, info.metadata, info.groups) == (7, config, {"loss": 0.5}, ("model", "key"))
    with pytest.raises(ck.CheckpointMismatchError, match="no optimiser state"):
        ck.load_checkpoint(tmp_path, model_like=model, opt_state_like=state)


def test_bad_arguments(tmp_path, trained):
    model, _, _ = trained
    with pytest.raises(TypeError, match="metadata\\['bad'\\]"):
        ck.save_checkpoint(tmp_path, step=1, model=model, metadata={"bad": object()})
    with pytest.raises(ValueError, match="non-negative"):
        ck.save_checkpoint(tmp_path, step=-1, model=model)
    with pytest.raises(ValueError, match="keep"):
        ck.save_checkpoint(tmp_path, step=1, model=model, keep=0)
    assert ck.latest_checkpoint(tmp_path) is None  # nothing was written


# ---------------------------------------------------------------------------- damage
@pytest.mark.parametrize("damage", ["truncate", "garble", "delete"])
def test_damaged_leaf_is_named(tmp_path, trained, damage):
    model, state, key = trained
    step_dir = ck.save_checkpoint(tmp_path, step=1, model=model, opt_state=state, key=key)
    chunk = _chunk_file(step_dir, "field.mlp.layers.2.weight")
    raw = chunk.read_bytes()
    if damage == "truncate":
        chunk.write_bytes(raw[: len(raw) // 2])
    elif damage == "garble":
        chunk.write_bytes(raw[:100] + bytes([raw[100] ^ 0x01]) + raw[101:])  # one flipped bit
    else:
        chunk.unlink()
    model_like, state_like = _fresh_template()
    with pytest.raises(ck.CorruptCheckpointError, match=r"model\.field\.mlp\.layers\[2\]\.weight"):
        ck.load_checkpoint(tmp_path, model_like=model_like, opt_state_like=state_like)
    with pytest.raises(ck.CorruptCheckpointError, match=r"layers\[2\]\.weight"):
        ck.verify_checkpoint(step_dir)


def test_damaged_zarr_metadata_is_corrupt(tmp_path, trained):
    model, _, _ = trained
    step_dir = ck.save_checkpoint(tmp_path, step=1, model=model)
    (step_dir / "arrays" / "model" / "field.mlp.layers.0.bias" / ".zarray").write_text("{not json")
    with pytest.raises(ck.CorruptCheckpointError, match=r"layers\[0\]\.bias.*unreadable"):
        ck.load_checkpoint(step_dir, model_like=model)


def test_missing_or_damaged_manifest_and_metadata(tmp_path, trained):
    model, _, _ = trained
    step_dir = ck.save_checkpoint(tmp_path, step=1, model=model, config="a = 1\n")
    (step_dir / "config.gin").write_text("a = 2\n")
    with pytest.raises(ck.CorruptCheckpointError, match="config.gin"):
        ck.read_checkpoint_info(tmp_path)
    step_dir = ck.save_checkpoint(tmp_path, step=2, model=model)
    (step_dir / "manifest.json").unlink()
    for path in (tmp_path, step_dir):
        with pytest.raises(ck.CorruptCheckpointError, match="manifest.json"):
            ck.load_checkpoint(path, model_like=model)
    (step_dir / "manifest.json").write_text('{"format": "zoo-checkpoint", "format_')
    with pytest.raises(ck.CorruptCheckpointError, match="not valid JSON"):
        ck.read_checkpoint_info(step_dir)


def test_other_width_is_a_mismatch_naming_the_leaf(tmp_path, trained):
    model, state, _ = trained
    ck.save_checkpoint(tmp_path, step=1, model=model, opt_state=state)
    narrow = eqx.filter_eval_shape(_cnf, jax.random.key(0), width=32)  # shapes suffice for a template
    with pytest.raises(ck.CheckpointMismatchError) as err:
        ck.load_checkpoint(tmp_path, model_like=narrow)
    assert str(err.value) == (
        "checkpoint and template differ at model.field.mlp.layers[0].weight: "
        "stored float32[64,3], template float32[32,3]"
    )
    # One hidden layer fewer names the first differing path.
    other = eqx.filter_eval_shape(
        lambda k: zoo.flows.CNF(zoo.fields.MLPField(2, depth=3, key=k), zoo.flows.StandardNormal(2)), jax.random.key(0)
    )
    first_difference = r"model\.field\.mlp\.layers\[3\]\.weight: stored float32\[64,64\], template float32\[2,64\]"
    with pytest.raises(ck.CheckpointMismatchError, match=first_difference):
        ck.load_checkpoint(tmp_path, model_like=other)
    # The optimiser state is checked too, and a dtype change is a mismatch.
    with jax.enable_x64(True):
        wide = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x, state)
        expected = r"opt_state.*stored float32\[64,3\], template float64\[64,3\]"
        with pytest.raises(ck.CheckpointMismatchError, match=expected):
            ck.load_checkpoint(tmp_path, model_like=model, opt_state_like=wide)


# ---------------------------------------------------------------------------- crashes
def test_exception_mid_write_keeps_previous_checkpoint(tmp_path, trained, monkeypatch):
    model, state, key = trained
    ck.save_checkpoint(tmp_path, step=1, model=model, opt_state=state, key=key)
    real_write, calls = ck._write_leaf, []

    def failing_write(target, data):
        calls.append(target)
        if len(calls) > 4:
            raise OSError("disk full")
        real_write(target, data)

    monkeypatch.setattr(ck, "_write_leaf", failing_write)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(tmp_path, step=2, model=model, opt_state=state, key=key)
    assert len(calls) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "step_00000001"]  # temp dir removed
    out = ck.load_checkpoint(tmp_path, model_like=model, opt_state_like=state)
    assert out.step == 1
    _assert_bit_identical(out.model, model)


def test_killed_writer_leaves_only_ignored_litter(tmp_path, trained):
    """A writer killed mid-save (no cleanup runs) leaves a hidden temp dir that the next save removes."""
    model, _, _ = trained
    ck.save_checkpoint(tmp_path, step=1, model=model)
    script = textwrap.dedent(
        f"""
        import os, jax, zoo
        from zoo import checkpoint as ck
        real, n = ck._write_leaf, [0]
        def dying_write(target, data):
            n[0] += 1
            if n[0] > 3:
                os._exit(17)  # like SIGKILL: no except/finally runs
            real(target, data)
        ck._write_leaf = dying_write
        model = zoo.flows.CNF(zoo.fields.MLPField(2, key=jax.random.key(0)), zoo.flows.StandardNormal(2))
        ck.save_checkpoint({str(tmp_path)!r}, step=2, model=model)
        """
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr
    (stale,) = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert len(list((stale / "arrays" / "model").iterdir())) == 3
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "step_00000001"
    assert ck.load_checkpoint(tmp_path, model_like=model).step == 1
    ck.save_checkpoint(tmp_path, step=3, model=model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "step_00000001", "step_00000003"]


# ---------------------------------------------------------------------------- archives
def test_pack_unpack_round_trip(tmp_path, trained):
    model, state, key = trained
    step_dir = ck.save_checkpoint(tmp_path / "run", step=4, model=model, opt_state=state, key=key, config="a = 1\n")
    digest = ck.checkpoint_sha256(step_dir)
    archive = ck.pack_checkpoint(step_dir, tmp_path / "ckpt.tar")
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert all(m.mtime == 0 and m.uid == 0 and m.mode == 0o644 and m.isfile() for m in members)

    dest = ck.unpack_checkpoint(archive, tmp_path / "copy", sha256=ck.file_sha256(archive))
    assert ck.checkpoint_sha256(dest) == digest
    # Packing the copy gives the same bytes: one sha256 identifies the shipped checkpoint.
    again = ck.pack_checkpoint(dest, tmp_path / "again.tar")
    assert ck.file_sha256(again) == ck.file_sha256(archive)
    model_like, state_like = _fresh_template()
    out = ck.load_checkpoint(dest, model_like=model_like, opt_state_like=state_like)
    _assert_bit_identical(out.model, model)
    _assert_bit_identical(out.key, key)

    # Any changed byte changes the hash; a wrong archive hash is refused before extraction.
    _chunk_file(dest, "field.mlp.layers.0.bias").write_bytes(b"\0" * 256)
    assert ck.checkpoint_sha256(dest) != digest
    with pytest.raises(ck.CorruptCheckpointError, match="sha256"):
        ck.unpack_checkpoint(archive, tmp_path / "other", sha256="0" * 64)
    assert not (tmp_path / "other").exists()
    with pytest.raises(ck.CheckpointError, match="not an empty dir"):
        ck.unpack_checkpoint(archive, dest)


def test_unpack_refuses_escaping_members(tmp_path):
    evil = tmp_path / "evil.tar"
    payload = tmp_path / "payload"
    payload.write_text("x")
    with tarfile.open(evil, "w") as tar:
        tar.add(payload, arcname="manifest.json")
        tar.add(payload, arcname="../escaped")
    with pytest.raises(ck.CorruptCheckpointError, match="refusing"):
        ck.unpack_checkpoint(evil, tmp_path / "dest")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "dest").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_a_full_disk_while_saving_is_named_and_publishes_nothing(tmp_path, monkeypatch):
    """tensorstore reports a failed write as a ValueError carrying the OS error code; the
    save names the checkpoint folder and the reason, removes its temporary folder and keeps
    the checkpoints written before."""
    import errno

    model = {"w": jnp.ones(3)}
    ck.save_checkpoint(tmp_path, step=1, model=model)
    real_open = ck.ts.open

    class FullDisk:
        """A tensorstore array whose writes fail the way a full disk makes them fail."""

        def __init__(self, future):
            self.future = future

        def result(self):
            self.future.result()
            return self

        def write(self, data):
            raise ValueError("RESOURCE_EXHAUSTED: Error writing local file \"x/0.0\": No space left on device [os_error_code='28']")

    monkeypatch.setattr(ck.ts, "open", lambda *a, **k: FullDisk(real_open(*a, **k)))
    with pytest.raises(ck.CheckpointWriteError) as err:
        ck.save_checkpoint(tmp_path, step=2, model=model)
    assert isinstance(err.value, OSError) and err.value.errno == errno.ENOSPC
    assert f"cannot write checkpoint step_00000002 in {tmp_path}: No space left on device" in str(err.value)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "step_00000001"]
    assert ck.load_checkpoint(tmp_path, model_like=model).step == 1
