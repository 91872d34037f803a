"""Pretrained models and their index: verified downloads (HTTP, file), retries, fall-through, cache
integrity after corruption and interruption, offline use, release, and the shipped models'
metrics reproduced within Monte-Carlo error."""

from __future__ import annotations

import http.server
import json
import math
import os
import socket
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo import checkpoint as ckpt
from zoo import pretrained
from zoo.resources import ROOT as REPO_ROOT

FAST = dict(attempts=3, backoff_s=0.01, timeout_s=10.0, quiet=True)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A small real checkpoint, packed: (archive path, its bytes, the step dir, the model)."""
    root = tmp_path_factory.mktemp("toy")
    model = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(4)}
    step_dir = ckpt.save_checkpoint(root / "checkpoint", step=7, model=model, config="# toy\n", metadata={"system": "Toy"})
    archive = ckpt.pack_checkpoint(step_dir, root / "toy.tar")
    return archive, archive.read_bytes(), step_dir, model


def write_index(path: Path, archive_bytes: bytes, locations, name="toy") -> Path:
    import hashlib

    entry = {
        "name": name,
        "system": "Toy",
        "gin": "gin/gmm_fm.gin",
        "recipe": "none; a test fixture",
        "size_bytes": len(archive_bytes),
        "sha256": hashlib.sha256(archive_bytes).hexdigest(),
        "locations": list(locations),
        "metrics": {"nll": 1.0, "ess_q": 0.5, "ess_p": 0.5, "n_samples_q": 10, "n_samples_p": 10, "top_log_q_error_q": 0.004, "top_log_q_error_p": 1.2, "n_top_checked": 8,
                    "log_q_offset_q": -0.001, "log_q_offset_p": 1.1, "top_log_q_excess_q": 0.005, "top_log_q_excess_p": 0.1},
    }
    return pretrained.write_index([entry], path)


class _Routes:
    """What the test server answers per path: bytes plus a failure mode for the first requests."""

    def __init__(self):
        self.lock = threading.Lock()
        self.routes: dict[str, dict] = {}
        self.hits: dict[str, int] = {}

    def set(self, path, body, *, fail=0, mode="503"):
        with self.lock:
            self.routes[path] = {"body": body, "fail": fail, "mode": mode}
            self.hits[path] = 0


def _handler(routes: _Routes):
    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = 5  # a stuck client cannot hold a server thread forever

        def log_message(self, *args):
            pass

        def do_GET(self):
            with routes.lock:
                route = routes.routes.get(self.path)
                routes.hits[self.path] = routes.hits.get(self.path, 0) + 1
                failing = route is not None and route["fail"] > 0
                if failing:
                    route["fail"] -= 1
            if route is None:
                self.send_error(404)
                return
            body = route["body"]
            if failing and route["mode"] == "503":
                self.send_error(503)
                return
            if failing and route["mode"] == "truncate":
                # Announce the full length, send half, close: an interrupted transfer.
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@pytest.fixture
def server():
    """An HTTP server on 127.0.0.1 in a daemon thread; shut down after the test (or after 120 s regardless)."""
    routes = _Routes()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(routes))
    srv.daemon_threads = True
    srv.handle_error = lambda request, address: None  # the truncating handler breaks its own pipe
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    guard = threading.Timer(120.0, srv.shutdown)
    guard.daemon = True
    guard.start()
    routes.url = f"http://127.0.0.1:{srv.server_address[1]}"
    routes.stop = lambda: (srv.shutdown(), srv.server_close())
    try:
        yield routes
    finally:
        guard.cancel()
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/models/toy.tar"


def cache_listing(cache: Path) -> list[str]:
    """Everything under the cache's models folder (relative paths)."""
    models = cache / "models"
    return sorted(p.relative_to(models).as_posix() for p in models.rglob("*")) if models.exists() else []


def assert_same_checkpoint(step_dir: Path, toy):
    _, _, original, model = toy
    assert ckpt.checkpoint_sha256(step_dir) == ckpt.checkpoint_sha256(original)
    restored = ckpt.load_checkpoint(step_dir, model_like=model)
    assert restored.step == 7
    np.testing.assert_array_equal(restored.model["w"], model["w"])


# ---------------------------------------------------------------------------- downloads
def test_http_download_is_verified_and_then_cached(tmp_path, toy, server, cache):
    _, data, _, _ = toy
    server.set("/models/toy.tar", data)
    reg = write_index(tmp_path / "models.toml", data, [f"{server.url}/models/toy.tar"])
    path = pretrained.download("toy", cache_dir=cache, model_index=reg, **FAST)
    assert_same_checkpoint(path, toy)
    entry = path.parent
    marker = json.loads((entry / pretrained.COMPLETE).read_text())
    assert marker["sha256"] == pretrained.model_info("toy", reg).sha256
    assert server.hits["/models/toy.tar"] == 1
    # A second call uses the cache: no request.
    assert pretrained.download("toy", cache_dir=cache, model_index=reg, **FAST) == path
    assert server.hits["/models/toy.tar"] == 1
    # force downloads again into the same place.
    assert pretrained.download("toy", cache_dir=cache, model_index=reg, force=True, **FAST) == path
    assert server.hits["/models/toy.tar"] == 2
    assert not [p for p in cache_listing(cache) if p.startswith(".")]


@pytest.mark.parametrize("form", ["file_url", "absolute", "kvstore_table"])
def test_file_locations(tmp_path, toy, cache, form):
    archive, data, _, _ = toy
    location = {
        "file_url": archive.as_uri(),
        "absolute": str(archive),
        "kvstore_table": {"driver": "file", "path": str(archive)},
    }[form]
    reg = write_index(tmp_path / "models.toml", data, [location])
    assert_same_checkpoint(pretrained.download("toy", cache_dir=cache, model_index=reg, **FAST), toy)


def test_relative_location_resolves_against_the_repository(tmp_path, toy, cache):
    archive, data, _, _ = toy
    rel = os.path.relpath(archive, REPO_ROOT)
    assert not Path(rel).is_absolute()
    reg = write_index(tmp_path / "models.toml", data, [rel])
    assert_same_checkpoint(pretrained.download("toy", cache_dir=cache, model_index=reg, **FAST), toy)


@pytest.mark.parametrize("via", ["http", "file"])
def test_corrupted_byte_is_refused_and_cache_left_clean(tmp_path, toy, server, cache, via):
    _, data, _, _ = toy
    bad = bytearray(data)
    bad[len(bad) // 3] ^= 0x01
    if via == "http":
        server.set("/models/toy.tar", bytes(bad))
        location = f"{server.url}/models/toy.tar"
    else:
        (tmp_path / "bad.tar").write_bytes(bytes(bad))
        location = str(tmp_path / "bad.tar")
    reg = write_index(tmp_path / "models.toml", data, [location])
    with pytest.raises(pretrained.ChecksumMismatchError, match="sha256") as err:
        pretrained.download("toy", cache_dir=cache, model_index=reg, **FAST)
    assert location in str(err.value)
    assert isinstance(err.value, ckpt.CorruptCheckpointError)
    assert cache_listing(cache) == []


def test_truncated_archive_of_right_length_claim_is_refused(tmp_path, toy, cache):
    _, data, _, _ = toy
    (tmp_path / "short.tar").write_bytes(data[:-512])
    reg = write_index(tmp_path / "models.toml", data, [str(tmp_path / "short.tar")])
    with pytest.raises(pretrained.ChecksumMismatchError, match=f"expected {len(data)} bytes"):
        pretrained.download("toy", cache_dir=cache, model_index=reg, **FAST)
    assert cache_listing(cache) == []


def test_interrupted_transfer_leaves_nothing_and_next_download_succeeds(tmp_path, toy, server, cache):
    _, data, _, _ = toy
    server.set("/models/toy.tar", data, fail=1, mode="truncate")
    reg = write_index(tmp_path / "models.toml", data, [f"{server.url}/models/toy.tar"])
    with pytest.raises(pretrained.DownloadError, match="toy.tar"):
        pretrained.download("toy", cache_dir=cache, model_index=reg, **{**FAST, "attempts": 1})
    assert cache_listing(cache) == []
    assert_same_checkpoint(pretrained.download("toy", cache_dir=cache, model_index=reg, **FAST), toy)


def test_litter_of_a_killed_download_is_never_used_and_is_cleaned(tmp_path, toy, cache):
    archive, data, _, _ = toy
    reg = write_index(tmp_path / "models.toml", data, [str(archive)])
    info = pretrained.model_info("toy", reg)
    models = cache / "models"
    models.mkdir(parents=True)
    # A process that has exited stands for a killed download.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = pretrained._temp_name("toy").split(".")[2]
    partial = models / f".tmp-toy.{host}.{dead.pid}.0123456789ab.tar"
    partial.write_bytes(data[: len(data) // 2])
    staging = models / f".tmp-toy.{host}.{dead.pid}.0123456789ab"
    (staging / "checkpoint").mkdir(parents=True)
    (staging / "checkpoint" / "manifest.json").write_text("{")
    # A download of a live process (this one) must be left alone.
    live = models / f".tmp-toy.{host}.{os.getpid()}.ba9876543210.tar"
    live.write_bytes(b"in progress")
    # An entry folder without the completion marker (e.g. copied by hand, half done).
    entry = pretrained._entry_dir(cache, info)
    (entry / "checkpoint").mkdir(parents=True)
    (entry / "checkpoint" / "manifest.json").write_text("{}")

    path = pretrained.download("toy", cache_dir=cache, model_index=reg, **FAST)
    assert_same_checkpoint(path, toy)
    assert not partial.exists() and not staging.exists()
    assert live.exists()
    live.unlink()
    assert cache_listing(cache)[0] == entry.name


def test_marker_with_another_sha_is_not_used(tmp_path, toy, cache):
    archive, data, _, _ = toy
    reg = write_index(tmp_path / "models.toml", data, [str(archive)])
    path = pretrained.download("toy", cache_dir=cache, model_index=reg, **FAST)
    marker = path.parent / pretrained.COMPLETE
    marker.write_text(json.dumps({"sha256": "0" * 64}))
    (path / "manifest.json").write_text("damaged")
    assert_same_checkpoint(pretrained.download("toy", cache_dir=cache, model_index=reg, **FAST), toy)


def test_concurrent_downloads_agree(tmp_path, toy, server, cache):
    _, data, _, _ = toy
    server.set("/models/toy.tar", data)
    reg = write_index(tmp_path / "models.toml", data, [f"{server.url}/models/toy.tar"])
    results, errors = [], []

    def fetch():
        try:
            results.append(pretrained.download("toy", cache_dir=cache, model_index=reg, **FAST))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == [] and len(set(results)) == 1
    assert_same_checkpoint(results[0], toy)
    assert not [p for p in cache_listing(cache) if p.startswith(".")]


@pytest.mark.parametrize("mode", ["503", "truncate"])
def test_flaky_location_is_retried(tmp_path, toy, server, cache, mode):
    _, data, _, _ = toy
    server.set("/models/toy.tar", data, fail=1, mode=mode)
    reg = write_index(tmp_path / "models.toml", data, [f"{server.url}/models/toy.tar"])
    # Tensorstore's own retries are off, so one attempt sees the failure ...
    with pytest.raises(pretrained.DownloadError):
        pretrained.download("toy", cache_dir=cache, model_index=reg, **{**FAST, "attempts": 1})
    assert server.hits["/models/toy.tar"] == 1
    # ... and our retry gets past it.
    server.set("/models/toy.tar", data, fail=2, mode=mode)
    assert_same_checkpoint(pretrained.download("toy", cache_dir=cache, model_index=reg, **FAST), toy)
    assert server.hits["/models/toy.tar"] == 3


def test_falls_through_to_a_later_location(tmp_path, toy, server, cache):
    archive, data, _, _ = toy
    server.set("/models/toy.tar", data)
    missing = f"{server.url}/elsewhere/toy.tar"  # 404: not retried
    refused = closed_port_url()
    reg = write_index(tmp_path / "models.toml", data, [missing, refused, f"{server.url}/models/toy.tar"])
    assert_same_checkpoint(pretrained.download("toy", cache_dir=cache, model_index=reg, **FAST), toy)
    assert server.hits["/elsewhere/toy.tar"] == 1


def test_nothing_reachable_lists_every_location(tmp_path, toy, server, cache):
    _, data, _, _ = toy
    locations = [f"{server.url}/nothing/toy.tar", closed_port_url(), str(tmp_path / "absent" / "toy.tar")]
    reg = write_index(tmp_path / "models.toml", data, locations)
    with pytest.raises(pretrained.DownloadError) as err:
        pretrained.download("toy", cache_dir=cache, model_index=reg, **FAST)
    message = str(err.value)
    for loc in locations:
        assert loc in message
    assert "does not exist" in message and "connect" in message.lower()
    assert cache_listing(cache) == []


def test_offline_use_from_the_cache(tmp_path, toy, server, cache):
    _, data, _, _ = toy
    server.set("/models/toy.tar", data)
    reg = write_index(tmp_path / "models.toml", data, [f"{server.url}/models/toy.tar"])
    first = pretrained.download("toy", cache_dir=cache, model_index=reg, **FAST)
    server.stop()
    assert pretrained.download("toy", cache_dir=cache, model_index=reg, **FAST) == first
    assert pretrained.resolve_checkpoint("toy", cache_dir=cache, model_index=reg) == first
    with pytest.raises(pretrained.DownloadError):
        pretrained.download("toy", cache_dir=cache, model_index=reg, force=True, **{**FAST, "attempts": 1})
    # A failed forced download keeps the verified entry.
    assert_same_checkpoint(pretrained.download("toy", cache_dir=cache, model_index=reg, **FAST), toy)


def test_a_cache_entry_damaged_after_download_is_named_with_its_repair(tmp_path, toy, cache, capsys):
    from zoo.cli import download as download_cli

    archive, data, _, _ = toy
    reg = write_index(tmp_path / "models.toml", data, [str(archive)])
    path = pretrained.download("toy", cache_dir=cache, model_index=reg, **FAST)
    array_file = max((p for p in path.rglob("*") if p.is_file() and p.name != "manifest.json"), key=lambda p: p.stat().st_size)
    raw = bytearray(array_file.read_bytes())
    raw[-1] ^= 0xFF
    array_file.write_bytes(bytes(raw))
    for fetch in (
        lambda: pretrained.resolve_checkpoint("toy", cache_dir=cache, model_index=reg),
        lambda: pretrained.download("toy", cache_dir=cache, model_index=reg, verify=True, **FAST),
    ):
        with pytest.raises(pretrained.DamagedCacheError) as err:
            fetch()
        assert str(path.parent) in str(err.value) and "tools/download toy --force" in str(err.value)
    # The command line says so too, instead of printing the damaged folder as if it were fine ...
    with pytest.raises(SystemExit) as stop:
        download_cli.main(["toy", f"--cache_dir={cache}", f"--index={reg}"])
    assert stop.value.code == 2
    message = capsys.readouterr().err
    assert "--force" in message and "Traceback" not in message
    # ... and --force repairs it.
    download_cli.main(["toy", f"--cache_dir={cache}", f"--index={reg}", "--force"])
    assert_same_checkpoint(pretrained.resolve_checkpoint("toy", cache_dir=cache, model_index=reg), toy)


@pytest.fixture
def silent_server():
    """A TCP server that accepts connections and never answers (a stalled host)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}/models/toy.tar"
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        srv.close()


def test_a_stalled_server_is_reported_while_waiting_and_bounded_by_the_deadline(tmp_path, toy, cache, silent_server, monkeypatch, capsys):
    import time

    _, data, _, _ = toy
    reg = write_index(tmp_path / "models.toml", data, [silent_server])
    monkeypatch.setattr(pretrained, "HEARTBEAT_S", 0.25)
    start = time.monotonic()
    with pytest.raises(pretrained.DownloadError) as err:
        pretrained.download("toy", cache_dir=cache, model_index=reg, attempts=10, backoff_s=0.01, timeout_s=1.0, deadline_s=2.5)
    elapsed = time.monotonic() - start
    assert 2.0 < elapsed < 6.0  # ten attempts of 1 s would take 10 s; the deadline stops them at 2.5 s
    log = capsys.readouterr().err
    assert "attempt 1/10" in log and "attempt 2/10" in log and "still waiting for" in log
    assert "deadline" in str(err.value) and "no complete answer" in str(err.value)
    with pytest.raises(ValueError, match="deadline_s"):
        pretrained.download("toy", cache_dir=cache, model_index=reg, deadline_s=0)


# ---------------------------------------------------------------------------- names and the model index
def test_unknown_name_suggests_close_names(tmp_path, toy):
    _, data, _, _ = toy
    reg = tmp_path / "models.toml"
    write_index(reg, data, ["/x/lj13_eqotfm.tar"], name="lj13_eqotfm")
    with pytest.raises(pretrained.UnknownModelError, match="did you mean 'lj13_eqotfm'"):
        pretrained.model_info("lj13_eqotfn", reg)
    with pytest.raises(pretrained.UnknownModelError, match="neither an existing checkpoint path"):
        pretrained.resolve_checkpoint("lj31_eqotfm", model_index=reg)
    with pytest.raises(pretrained.UnknownModelError) as err:
        pretrained.download("zzz", model_index=reg)
    assert "did you mean" not in str(err.value) and "lj13_eqotfm" in str(err.value)


def test_existing_path_is_used_as_is(tmp_path, toy):
    _, _, step_dir, _ = toy
    assert pretrained.resolve_checkpoint(step_dir, model_index=tmp_path / "none.toml") == step_dir
    assert pretrained.resolve_checkpoint(str(step_dir.parent), model_index=tmp_path / "none.toml") == step_dir.parent


def test_model_index_validation(tmp_path, toy):
    _, data, _, _ = toy
    reg = write_index(tmp_path / "models.toml", data, ["a.tar"])
    raw = tomllib.loads(reg.read_text())["models"][0]
    for change, match in [
        ({"sha256": "abc"}, "sha256"),
        ({"size_bytes": 0}, "size_bytes"),
        ({"locations": []}, "locations"),
        ({"name": "../evil"}, "name"),
        ({"metrics": {"nll": "low"}}, "metrics"),
    ]:
        with pytest.raises(pretrained.ModelIndexError, match=match):
            pretrained.write_index([{**raw, **change}], tmp_path / "bad.toml")
    del raw["gin"]
    with pytest.raises(pretrained.ModelIndexError, match="lacks gin"):
        pretrained._check_entry(raw, "x")
    text = reg.read_text()
    (tmp_path / "dup.toml").write_text(text + text[text.index("[[models]]") :])
    with pytest.raises(pretrained.ModelIndexError, match="twice"):
        pretrained.load_index(tmp_path / "dup.toml")


def test_model_index_writer_round_trips_awkward_values(tmp_path, toy):
    _, data, _, _ = toy
    reg = write_index(tmp_path / "models.toml", data, ["a.tar"])
    raw = tomllib.loads(reg.read_text())["models"][0]
    raw["recipe"] = 'quotes " and \\ backslash\nsecond line; ünïcode'
    raw["metrics"] = {"nll": float("inf"), "ess_q": 1e-300, "ess_p": 0.0, "kl": -0.5, "n_samples_q": 3}
    raw["locations"] = ["a.tar", {"driver": "s3", "bucket": "zoo-models", "path": "v1/a.tar", "endpoint": "http://h:9000"}]
    pretrained.write_index([raw], reg)
    back = tomllib.loads(reg.read_text())["models"][0]
    assert back == raw
    assert math.isinf(pretrained.model_info("toy", reg).metrics["nll"])


def test_release_packs_and_registers_a_run(tmp_path):
    workdir = tmp_path / "run"
    model = {"w": jnp.ones((2, 2))}
    ckpt.save_checkpoint(workdir / "checkpoint", step=5, model=model, config="train.batch_size = 64\n", metadata={"system": "Toy"})
    step_dir = ckpt.save_checkpoint(
        workdir / "checkpoint", step=10, model=model, config="train.batch_size = 64\ntrain.loss = @FlowMatching()\n", metadata={"system": "Toy"}
    )
    metrics = {"nll": 1.5, "ess_q": 0.75, "ess_p": "nan", "path_length": 2.0, "n_samples_q": 100, "n_samples_p": 50, "n_nonfinite_q": 0}
    (workdir / "metrics.json").write_text(json.dumps(metrics))
    (workdir / "log.jsonl").write_text('{"step": 1, "compile_s": 2.0}\n{"step": 10, "time_s": 3.5, "loss": 1.0}\n')
    reg = tmp_path / "models.toml"
    info = pretrained.release(workdir, "toy_run", gin_file="gmm_fm.gin", dest=tmp_path / "out", model_index=reg, machine="test box")
    archive = tmp_path / "out" / "toy_run.tar"
    assert info.sha256 == ckpt.file_sha256(archive) and info.size_bytes == archive.stat().st_size
    assert info.gin == "gin/gmm_fm.gin" and info.system == "Toy" and info.extra["step"] == 10
    assert info.metrics["nll"] == 1.5 and math.isnan(info.metrics["ess_p"]) and info.metrics["n_samples_p"] == 50
    assert "n_nonfinite_q" not in info.metrics
    assert info.recipe == "FlowMatching, 10 steps, batch 64, ?; 4 s training (+2 s compilation); test box"
    assert info.locations == (str(archive.resolve()),)
    # The released entry downloads and is the same checkpoint.
    path = pretrained.download("toy_run", cache_dir=tmp_path / "cache", model_index=reg, **FAST)
    assert ckpt.checkpoint_sha256(path) == ckpt.checkpoint_sha256(step_dir)
    # Releasing again replaces the entry; a mirror is appended after the archive.
    pretrained.release(workdir, "toy_run", gin_file="gmm_fm.gin", recipe="r", dest=tmp_path / "out", model_index=reg, locations=["https://example.org/toy_run.tar"])
    assert pretrained.list_models(reg) == ["toy_run"]
    assert pretrained.model_info("toy_run", reg).locations[1] == "https://example.org/toy_run.tar"
    # Bindings given on release end the released config; the run's own checkpoint is untouched.
    from zoo.cli import release_model

    release_model.main(
        [str(workdir), "toy_run", "--gin=gmm_fm.gin", "--recipe=r", f"--dest={tmp_path / 'out'}", f"--index={reg}", "--gin_param=stored_dataset.path = 'assets/data/x'"]
    )
    path = pretrained.download("toy_run", cache_dir=tmp_path / "cache", model_index=reg, force=True, **FAST)
    released = ckpt.load_checkpoint(path, model_like=model)
    assert released.config.startswith("train.batch_size = 64\ntrain.loss = @FlowMatching()\n")
    assert released.config.endswith("# Bindings added on release:\nstored_dataset.path = 'assets/data/x'\n")
    assert ckpt.load_checkpoint(step_dir, model_like=model).config == "train.batch_size = 64\ntrain.loss = @FlowMatching()\n"
    jax.tree.map(np.testing.assert_array_equal, released.model, model)
    # Metrics of another step than the checkpoint's are refused.
    (workdir / "log.jsonl").write_text('{"step": 12, "time_s": 3.5}\n')
    with pytest.raises(pretrained.ModelIndexError, match="step 12"):
        pretrained.release(workdir, "toy_run", gin_file="gmm_fm.gin", recipe="r", dest=tmp_path / "out", model_index=reg)


def test_reevaluated_metrics_replace_only_the_metrics(tmp_path, toy):
    from zoo.cli import release_model

    archive, data, _, _ = toy
    reg = write_index(tmp_path / "models.toml", data, [str(archive)])
    before = pretrained.model_info("toy", reg)
    run = tmp_path / "eval"
    run.mkdir()
    new = {"nll": 0.9, "nll_se": 0.01, "ess_q": 0.6, "ess_q_se": 0.02, "ess_p": 0.55, "ess_p_se": 0.03, "n_samples_q": 1024}
    (run / "metrics.json").write_text(json.dumps({**new, "n_samples_p": 1024, "divergence": "exact", "checkpoint": "toy"}))
    release_model.main([str(run), "toy", "--reevaluated", "--index", str(reg)])
    after = pretrained.model_info("toy", reg)
    assert after.metrics == {**new, "n_samples_p": 1024}
    assert after.extra["evaluation"] == {"divergence": "exact"}
    assert (after.sha256, after.locations, after.recipe) == (before.sha256, before.locations, before.recipe)
    # The recipe says how the model was trained and is never rewritten, even where it mentions
    # metrics; the new evaluation's settings replace the old ones wholesale (no adaptive
    # tolerances left beside a fixed-step solver).
    entries = pretrained._read_index_file(reg)
    entries[0]["recipe"] = "FM, 10 steps; metrics: exact divergence, RK4-20, 256 model / 256 test samples"
    entries[0]["evaluation"] = {"divergence": "exact", "solver": "dopri5", "solver_rtol": 1e-5, "solver_atol": 1e-5}
    pretrained.write_index(entries, reg)
    evaluation = {"divergence": "exact", "solver": "rk4", "n_solver_steps": 40, "n_samples_p": 10000, "n_samples_q": 10000}
    (run / "metrics.json").write_text(json.dumps({**new, **evaluation, "checkpoint": "toy"}))
    after = pretrained.replace_metrics("toy", run / "metrics.json", model_index=reg)
    assert after.recipe == "FM, 10 steps; metrics: exact divergence, RK4-20, 256 model / 256 test samples"
    assert after.extra["evaluation"] == {"divergence": "exact", "solver": "rk4", "n_solver_steps": 40}
    assert (after.metrics["n_samples_q"], after.metrics["n_samples_p"]) == (10000, 10000)
    # An evaluation of another checkpoint is refused, naming both.
    (run / "metrics.json").write_text(json.dumps({**new, "n_samples_p": 1024, "checkpoint": "runs/x/checkpoint"}))
    with pytest.raises(pretrained.ModelIndexError, match="'runs/x/checkpoint', not of the released 'toy'"):
        pretrained.replace_metrics("toy", run / "metrics.json", model_index=reg)


def test_ess_from_hutchinson_log_densities_is_listed_as_a_lower_bound(tmp_path, toy, monkeypatch, capsys):
    from zoo.cli import zoo as zoo_cli

    archive, data, _, _ = toy
    reg = write_index(tmp_path / "models.toml", data, [str(archive)])
    entries = pretrained._read_index_file(reg)
    entries[0]["evaluation"] = {"divergence": "hutchinson-8-orthogonal", "solver": "rk4", "n_solver_steps": 20}
    pretrained.write_index(entries, reg)
    monkeypatch.setenv("ZOO_MODELS", str(reg))
    zoo_cli.main(["list", "--models"])
    out = capsys.readouterr().out
    assert "≥ 0.500" in out.splitlines()[1] and "hutchinson-8-orthogonal divergence, RK4-20" in out
    assert any(line.startswith("≥: an ESS from Hutchinson log densities, a lower bound") for line in out.splitlines())
    zoo_cli.main(["show", "toy"])
    shown = capsys.readouterr().out.splitlines()
    assert "  ESS-q:       ≥ 0.5" in shown and "  NLL:         1" in shown
    assert any(line.startswith("  ≥: an ESS from Hutchinson") for line in shown)


def test_cli_list_models_and_download(tmp_path, toy, monkeypatch, capsys):
    from zoo.cli import download
    from zoo.cli import zoo as zoo_cli

    archive, data, _, _ = toy
    reg = write_index(tmp_path / "models.toml", data, [str(archive)])
    monkeypatch.setenv("ZOO_MODELS", str(reg))
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))
    zoo_cli.main(["list", "--models"])
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["name", "system", "recipe", "NLL", "ESS-q", "ESS-p", "path", "len", "evaluated", "with", "size"]
    assert "toy" in out and "Toy" in out and "1.000" in out and "0.500" in out
    zoo_cli.main(["show", "toy"])
    shown = capsys.readouterr().out.splitlines()
    assert shown[0] == "toy (Toy, gin/gmm_fm.gin)" and shown[1] == "  recipe: none; a test fixture"
    assert "  ESS-q:       0.5" in shown and any(line.startswith("  evaluated with: ") and line.endswith("n=10/10") for line in shown)
    assert f"  location: {archive}" in shown
    assert "  log q of the 8 highest weights, the evaluation's solver against exact divergence, Dopri5 rtol = atol = 1e-6: within 0.004 (model) / 1.2 (test) nats" in shown
    assert "  of which shared by typical samples: -0.001 (model) / +1.1 (test) nats; beyond it: 0.005 / 0.1 nats" in shown
    with pytest.raises(SystemExit):
        zoo_cli.main(["show", "tyo"])
    assert "no pretrained model named 'tyo'" in capsys.readouterr().err
    assert not any(line.startswith("  ≥") for line in shown)
    download.main(["toy"])
    assert Path(capsys.readouterr().out.strip()).parent.parent == tmp_path / "cache" / "models"
    with pytest.raises(SystemExit):
        download.main(["tyo"])
    assert "did you mean 'toy'" in capsys.readouterr().err



def _parent_and_child(tmp_path, toy, *, child_evaluation=None, child_counts=(10, 10)) -> Path:
    """An index holding ``toy`` and its fine-tuned ``toy_pg``, both with standard errors."""
    archive, data, _, _ = toy
    reg = write_index(tmp_path / "models.toml", data, [str(archive)])
    parent = pretrained._read_index_file(reg)[0]
    parent["metrics"] = {"nll": 2.0, "nll_se": 0.3, "ess_q": 0.2, "ess_q_se": 0.03, "ess_p": 0.1, "ess_p_se": 0.04, "path_length": 3.0, "n_samples_q": 10, "n_samples_p": 10}
    parent["evaluation"] = {"divergence": "exact", "solver": "rk4", "n_solver_steps": 40}
    child = {**parent, "name": "toy_pg", "parent": "toy", "evaluation": child_evaluation or parent["evaluation"]}
    child["metrics"] = {"nll": 1.6, "nll_se": 0.4, "ess_q": 0.5, "ess_q_se": 0.04, "ess_p": 0.4, "ess_p_se": 0.03, "path_length": 3.25,
                        "n_samples_q": child_counts[0], "n_samples_p": child_counts[1]}  # fmt: skip
    return pretrained.write_index([parent, child], reg)


def test_a_fine_tuned_model_is_set_against_its_parent(tmp_path, toy, monkeypatch, capsys):
    from zoo.cli import zoo as zoo_cli

    reg = _parent_and_child(tmp_path, toy)
    models = pretrained.load_index(reg)
    assert models["toy_pg"].parent == "toy" and models["toy"].parent is None
    (gain,) = pretrained.fine_tuning_gains(models)
    assert (gain.child, gain.parent, gain.alike) == ("toy_pg", "toy", True)
    assert gain.change["nll"] == pytest.approx((-0.4, 0.5))  # the errors add in quadrature: √(0.3² + 0.4²)
    assert gain.change["ess_q"] == pytest.approx((0.3, 0.05))
    assert gain.change["path_length"] == pytest.approx((0.25, None)) and gain.significance("path_length") is None
    assert gain.significance("ess_q") == pytest.approx(6.0)
    assert gain.change_in_words("ess_p") == "+0.300 ± 0.050 (+6.0 SE)"
    monkeypatch.setenv("ZOO_MODELS", str(reg))
    zoo_cli.main(["list", "--models"])
    out = capsys.readouterr().out.splitlines()
    header = out.index(next(line for line in out if line.startswith("model ")))
    assert out[header + 1].split()[:6] == ["toy_pg", "toy", "-0.400", "±", "0.500", "(-0.8"]
    assert out[header + 1].endswith("yes")
    zoo_cli.main(["gains"])  # the same table alone
    assert capsys.readouterr().out.splitlines()[3:] == out[header : header + 2]
    zoo_cli.main(["gains", "--markdown"])
    assert "| `toy_pg` (`toy`) | 2.000 ± 0.3 → 1.600 ± 0.4 (-0.400 ± 0.500) |" in capsys.readouterr().out
    zoo_cli.main(["show", "toy"])  # the parent's page names its fine-tuned model too
    assert "  fine-tuning: toy_pg against toy: NLL -0.400 ± 0.500 (-0.8 SE), ESS-q +0.300 ± 0.050" in capsys.readouterr().out

    # Measured differently, the table says how; an ESS that is only a lower bound gets no change.
    hutchinson = {"divergence": "hutchinson", "solver": "rk4", "n_solver_steps": 20}
    (gain,) = pretrained.fine_tuning_gains(pretrained.load_index(_parent_and_child(tmp_path, toy, child_evaluation=hutchinson, child_counts=(20, 10))))
    assert not gain.alike and set(gain.change) == {"nll", "path_length"}
    assert gain.differences == ("exact divergence, RK4-40 vs hutchinson divergence, RK4-20", "n=10/10 vs n=20/10")
    zoo_cli.main(["list", "--models"])
    assert "no: exact divergence, RK4-40 vs hutchinson divergence, RK4-20; n=10/10 vs n=20/10" in capsys.readouterr().out

    # A parent the index does not hold, or the model itself, is refused.
    entries = pretrained._read_index_file(reg)
    for parent, match in (("tyo", "which the index does not hold"), ("toy_pg", "another model")):
        entries[1]["parent"] = parent
        with pytest.raises(pretrained.ModelIndexError, match=match):
            pretrained.write_index(entries, tmp_path / "bad.toml")
            pretrained.load_index(tmp_path / "bad.toml")


def test_the_readme_shows_the_fine_tuned_models_as_the_index_has_them(monkeypatch):
    """The README's table of fine-tuned models against their parents is `tools/zoo gains --markdown` now."""
    from zoo.cli.zoo import gains_markdown

    monkeypatch.delenv("ZOO_MODELS", raising=False)
    table = "\n".join(gains_markdown(pretrained.load_index()))
    assert table.count("\n") >= 5 and "`lj13_eqotfm_pg` (`lj13_eqotfm`)" in table
    assert table in (REPO_ROOT / "README.md").read_text(), "refresh the README's table with: tools/zoo gains --markdown"


def test_release_records_the_model_a_run_fine_tuned(tmp_path, toy):
    import hashlib

    from zoo.cli import release_model

    archive, data, _, _ = toy
    reg = write_index(tmp_path / "models.toml", data, [str(archive)])
    model = {"w": jnp.ones(2)}

    def run(name: str, config: str) -> Path:
        workdir = tmp_path / name
        ckpt.save_checkpoint(workdir / "checkpoint", step=3, model=model, config=config, metadata={"system": "Toy"})
        (workdir / "metrics.json").write_text(json.dumps({"nll": 1.0, "ess_q": 0.6, "ess_p": 0.6, "n_samples_q": 10, "n_samples_p": 10}))
        return workdir

    release = dict(gin_file="gmm_fm.gin", recipe="r", dest=tmp_path / "out", model_index=reg)
    released = pretrained.release(run("pg", "finetune.pretrained = 'toy'\n"), "toy_pg", **release)
    assert (released.parent, released.parent_sha256) == ("toy", hashlib.sha256(data).hexdigest())
    # Fine-tuning the fine-tuned model again keeps its parent; a run from a checkpoint folder, or
    # a training run, names none.
    assert pretrained.release(run("pg2", "finetune.pretrained = 'toy_pg'\n"), "toy_pg", **release).parent == "toy"
    assert pretrained.release(run("pg3", "finetune.pretrained = 'runs/x/checkpoint'\n"), "toy_pg3", **release).parent is None
    assert pretrained.release(run("fm", "train.batch_size = 64\n"), "toy_fm", **release).parent is None
    assert pretrained.model_info("toy_pg", reg).parent_sha256 == hashlib.sha256(data).hexdigest()
    # Named on the command line: it must be another released model.
    release_model.main([str(tmp_path / "fm"), "toy_fm", "--gin=gmm_fm.gin", "--recipe=r", f"--dest={tmp_path / 'out'}", f"--index={reg}", "--parent=toy"])
    assert pretrained.model_info("toy_fm", reg).parent == "toy"
    with pytest.raises(pretrained.ModelIndexError, match="another model"):
        pretrained.release(tmp_path / "fm", "toy_fm", **release, parent="tyo")
    assert list(pretrained._read_index_file(reg)[1])[:6] == ["name", "system", "gin", "recipe", "parent", "parent_sha256"]
    # The parent's archive as it was released when its child was: a re-release of the parent
    # makes the comparison one against another model, and the table says so.
    assert pretrained.model_info("toy_pg", reg).parent_sha256 == pretrained.model_info("toy", reg).sha256
    entries = pretrained._read_index_file(reg)
    entries[0]["sha256"] = "0" * 64
    pretrained.write_index(entries, reg)
    gains = {g.child: g for g in pretrained.fine_tuning_gains(pretrained.load_index(reg))}
    assert gains["toy_pg"].differences[0].startswith("fine-tuned from an earlier release of toy (sha256 ")
    assert not gains["toy_pg"].alike


def test_how_each_log_density_was_solved_in_words():
    from zoo.flows.cnf import describe_in_words

    assert describe_in_words({"divergence": "exact", "solver": "rk4", "n_solver_steps": 40}) == "exact divergence, RK4-40"
    adaptive = {"divergence": "exact", "solver": "dopri5", "solver_rtol": 1e-5, "solver_atol": 1e-6}
    assert describe_in_words(adaptive) == "exact divergence, Dopri5 rtol = 1e-5, atol = 1e-6"
    assert describe_in_words({"divergence": "hutchinson"}) == "hutchinson divergence, ?"
    assert describe_in_words({}) == "unknown divergence and solver"


# ---------------------------------------------------------------------------- the shipped models
SHIPPED = pretrained.load_index(pretrained.INDEX_FILE)
# Systems cheap enough to evaluate in the default suite (2-D, seconds); the rest are slow.
FAST_SYSTEMS = {"GaussianMixture2D"}


def _bootstrap_se(stat, log_w: np.ndarray, n_boot: int = 1000, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(log_w), size=(n_boot, len(log_w)))
    return float(np.std([stat(log_w[i]) for i in idx], ddof=1))


def _disagreements(flow, system, dataset, rec: dict, n: int = 512) -> list[str]:
    r"""Which recorded metrics a fresh n-sample evaluation of ``flow`` contradicts.

    - NLL, KL, path length are means: the new estimate must lie within 4 standard errors
      $s/\sqrt n$ ($s$ the per-sample spread) of the recorded one. The recorded NLL and KL
      are means over a superset of the same test samples, so this is conservative.
    - ESS-q and ESS-p: accepted within 4 bootstrap SEs (combined for both estimates, the
      recorded one's scaled by $\sqrt{n/n_\text{rec}}$), or within a 30 % relative band on
      $1/\text{ESS} - 1$ (for Kish's ESS that is the weights' squared coefficient of
      variation). The band is there because both are ratios of sums of weights whose
      bootstrap SE is too small when a few weights dominate, as they do for poor models;
      a relative band on the weight variance, not on ESS itself, stays meaningful from
      ESS ≈ 1 down to ESS ≪ 1. When the record rests on more samples than the n here, a
      higher fresh ESS is no disagreement: n samples rarely hold the few states whose
      weights dominate the record's sums (dw4_eqotfm: ESS-p 0.07 from 10 000 test samples,
      where one carries 90 % of the weight, ~0.9 from the first 512), so only a fresh ESS
      below the record is tested there.
    """
    from zoo.flows.cnf import sample_and_log_prob_chunked
    from zoo.metrics import ess_p, ess_q, evaluate_flow

    key = jax.random.PRNGKey(99)
    metrics, arrays = evaluate_flow(flow, system, dataset, key=key, n_samples=n, n_target=n, check_top=0)
    bad = []
    log_q_t = np.asarray(arrays["log_q_target"], np.float64)
    means = {"nll": -log_q_t}
    if "kl" in rec:
        means["kl"] = -np.asarray(arrays["u_target"], np.float64) - system.log_z - log_q_t
    if "path_length" in rec:
        # evaluate_flow keeps no per-sample path lengths; the same key draws the same samples again.
        again = sample_and_log_prob_chunked(flow, jax.random.split(key, 3)[0], n, chunk_size=1024)
        means["path_length"] = np.asarray(again["path_length"], np.float64)
        np.testing.assert_allclose(means["path_length"].mean(), metrics["path_length"], rtol=1e-5)
    for name, values in means.items():
        se = values.std(ddof=1) / math.sqrt(n)
        if not abs(metrics[name] - rec[name]) < 4 * se:
            bad.append(f"{name}: {metrics[name]:.4f} vs recorded {rec[name]:.4f} (4 SE = {4 * se:.4f})")
    for name, stat, log_w, n_rec in [
        ("ess_q", ess_q, np.asarray(arrays["log_w_model"]), rec["n_samples_q"]),
        ("ess_p", ess_p, -np.asarray(arrays["u_target"]) - log_q_t, rec["n_samples_p"]),
    ]:
        se = _bootstrap_se(stat, log_w) * math.sqrt(1 + n / n_rec)
        new, old = metrics[name], rec[name]
        cv2_ratio = (1 / new - 1) / (1 / old - 1) if 0 < new < 1 and 0 < old < 1 else math.inf
        fewer_samples_may_miss_the_heaviest = n < n_rec and new > old
        if not (fewer_samples_may_miss_the_heaviest or abs(new - old) < 4 * se or 1 / 1.3 <= cv2_ratio <= 1.3):
            bad.append(f"{name}: {new:.4f} vs recorded {old:.4f} (4 SE = {4 * se:.4f}, (1/ESS-1) ratio {cv2_ratio:.2f})")
    return bad


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=() if m.system in FAST_SYSTEMS else pytest.mark.slow) for n, m in SHIPPED.items()],
)
def test_shipped_model_reproduces_its_metrics(name, tmp_path, monkeypatch):
    """Download the shipped archive, rebuild the flow from its stored config, re-measure
    on 512 fresh samples (tolerances in :func:`_disagreements`); an untrained flow of the
    same architecture must be caught by the same criteria."""
    from zoo.experiments import config
    from zoo.experiments import runs as experiment

    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))
    info = SHIPPED[name]
    system, flow, restored = experiment.load_flow(name)
    assert type(system).__name__ == info.system
    assert restored.step == info.extra.get("step", restored.step)
    dataset = config.make_dataset(system)
    # Loaded by name, the flow is set up the way the release was measured (e.g. Dopri5 for DW4).
    table = pretrained.evaluation_table(info)
    described = flow.describe()
    assert {k: described.get(k) for k in table} == table
    assert _disagreements(flow, system, dataset, info.metrics) == []
    # The loaded flow with freshly initialised weights (so the compiled code is reused).
    import equinox as eqx

    init = eqx.filter(config.make_flow(system, key=jax.random.PRNGKey(1)).as_described(table), eqx.is_array)
    arrays, static = eqx.partition(flow, eqx.is_array)
    assert jax.tree.structure(init) == jax.tree.structure(arrays)
    untrained = eqx.combine(jax.tree.map(lambda a, b: a.astype(b.dtype), init, arrays), static)
    assert len(_disagreements(untrained, system, dataset, info.metrics)) >= 2
