"""Data-parallel training (FM, OT FM, EQ-OT FM, path gradients; MLP and EGNN) and chunked evaluation on
4 (virtual CPU) devices equal 1-device runs."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, sys, tempfile
    import zoo  # before JAX starts its backends (zoo sets XLA flags at import)
    import jax, numpy as np, optax, equinox as eqx
    assert len(jax.devices()) == 4, jax.devices()
    from zoo.data import exact_samples
    from zoo.fields import MLPField
    from zoo.flows import CNF, StandardNormal
    from zoo.losses import FlowMatching, OTFlowMatching
    from zoo.systems import GaussianMixture2D
    from zoo.train import RunSettings, fit

    from zoo import parallel
    probe = parallel.shard_batch(np.zeros((2, 64, 2)), parallel.data_mesh(4), axis=1)
    assert len(probe.addressable_shards) == 4 and probe.addressable_shards[0].data.shape == (2, 16, 2)
    from zoo.data import stored_dataset
    from zoo.fields import EGNNField
    from zoo.flows import MeanFreeNormal
    from zoo.losses import EquivariantOTFlowMatching, PathGradientForwardKL
    from zoo.systems import DoubleWell
    data = exact_samples(GaussianMixture2D(), n_train=512, n_val=64, n_test=64)
    flow = CNF(MLPField(2, width=32, depth=2, key=jax.random.PRNGKey(0)), StandardNormal(2), n_steps=4)
    # The EGNN trains through its chunked fast path (hand-written pair-message VJP) and the
    # path gradient through its own adjoint solves: both must shard like plain autodiff.
    dw4 = stored_dataset(DoubleWell(), path="assets/data/dw4", n_train=512, n_val=64, n_test=64)
    egnn = CNF(EGNNField(4, 2, hidden=16, n_layers=2, key=jax.random.PRNGKey(0)), MeanFreeNormal(4, 2), n_steps=3, divergence="hutchinson")
    cases = {
        "FlowMatching": (flow, data, FlowMatching()),
        "OTFlowMatching": (flow, data, OTFlowMatching()),
        "PathGradientForwardKL": (flow, data, PathGradientForwardKL()),
        "EGNN EquivariantOTFlowMatching": (egnn, dw4, EquivariantOTFlowMatching()),
        # The unchunked EGNN FM and PG steps on a sharded batch are test_two_processes_train_like_one's.
        "EGNN FlowMatching chunked": (egnn, dw4, FlowMatching(chunk_size=8)),
        "EGNN PathGradientForwardKL chunked": (egnn, dw4, PathGradientForwardKL(chunk_size=8)),
    }
    out = {}
    for name, (flow_, data_, loss) in cases.items():
        results = []
        for n_devices in (1, 4):
            with tempfile.TemporaryDirectory() as d:
                settings = RunSettings(n_steps=6 if "EGNN" not in name else 3, batch_size=64 if "Path" not in name else 16,
                                       accumulation=2, seed=1, progress=False, log_every=1, n_devices=n_devices)
                model, records = fit(flow_, data_, loss, optax.adam(1e-2), settings, workdir=d)
            leaves = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
            shardings = {str(l.sharding.spec) for l in leaves}
            results.append(([np.asarray(l).tolist() for l in leaves], [r["loss"] for r in records if "loss" in r], sorted(shardings)))
        out[name] = results
    # Chunked losses keep the batch sharded inside every chunk: the compiled gradient reduces
    # parameter gradients across devices and never gathers the batch onto each of them.
    from zoo.data import Batch
    mesh = parallel.data_mesh(4)
    rng = np.random.default_rng(0)
    sharded = parallel.shard_batch(Batch(x=rng.normal(size=(16, 8)).astype(np.float32),
                                         forces=rng.normal(size=(16, 8)).astype(np.float32)), mesh)
    for loss in (FlowMatching(chunk_size=4), PathGradientForwardKL(chunk_size=4)):
        step = eqx.filter_jit(lambda m, b: eqx.filter_grad(lambda mm: loss(mm, b, jax.random.PRNGKey(1))[0])(m))
        hlo = step.lower(parallel.replicate(egnn, mesh), sharded).compile().compiled.as_text()
        assert "all-gather" not in hlo and "all-reduce" in hlo, type(loss).__name__
    # Chunked evaluation spreads each chunk over the 4 devices; it must equal the plain batch.
    from zoo.flows import sample_and_log_prob_chunked, log_prob_chunked
    key = jax.random.PRNGKey(5)
    got = sample_and_log_prob_chunked(flow, key, 64, chunk_size=32)
    k0 = jax.random.split(key, 2)[0]
    x_ref, lq_ref = flow.sample_and_log_prob(k0, 32)
    np.testing.assert_allclose(got["x"][:32], x_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["log_q"][:32], lq_ref, rtol=1e-5, atol=1e-5)
    dens = log_prob_chunked(flow, got["x"], chunk_size=32)
    np.testing.assert_allclose(dens["log_q"], got["log_q"], atol=2e-3)
    print(json.dumps(out))
    """
)


def test_four_devices_match_one():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    import numpy as np

    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, ((params1, losses1, _), (params4, losses4, _)) in out.items():
        np.testing.assert_allclose(losses4, losses1, rtol=1e-5, err_msg=name)
        for a, b in zip(params1, params4):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6, err_msg=name)


TWO_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    process_id, n_processes, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    from zoo import parallel
    if n_processes > 1:
        assert parallel.initialize_distributed(f"127.0.0.1:{port}", n_processes, process_id)
    import jax, numpy as np, optax, equinox as eqx
    assert jax.process_count() == n_processes and len(jax.devices()) == n_processes
    from zoo.data import stored_dataset
    from zoo.fields import EGNNField
    from zoo.flows import CNF, MeanFreeNormal
    from zoo.losses import FlowMatching, PathGradientForwardKL
    from zoo.systems import DoubleWell
    from zoo.train import BatchSampler, make_step, step_key

    data = stored_dataset(DoubleWell(), path="assets/data/dw4", n_train=256, n_val=16, n_test=16)
    egnn = CNF(EGNNField(4, 2, hidden=16, n_layers=2, key=jax.random.PRNGKey(0)), MeanFreeNormal(4, 2), n_steps=3, divergence="hutchinson")
    mesh = parallel.data_mesh()
    result = {}
    for name, loss, batch_size in (("FM", FlowMatching(), 64), ("PG", PathGradientForwardKL(), 16)):
        optimizer = optax.adam(1e-2)
        model = parallel.replicate(egnn, mesh)
        opt_state = parallel.replicate(optimizer.init(eqx.filter(egnn, eqx.is_inexact_array)), mesh)
        step = make_step(loss, optimizer, 1)
        sampler, losses = BatchSampler(len(data.train), batch_size, 1), []
        for s in range(3):
            # Every process builds the same global batch and contributes the rows its devices hold.
            batch = parallel.shard_batch(sampler.micro_batches(data.train, s, 1), mesh, axis=1)
            model, opt_state, stats = step(model, opt_state, batch, step_key(jax.random.PRNGKey(1), s))
            losses.append(float(parallel.to_host(stats["loss"])))
        leaves = jax.tree.leaves(parallel.to_host(eqx.filter(model, eqx.is_inexact_array)))
        result[name] = {"losses": losses, "params": [np.asarray(l).tolist() for l in leaves]}
    if parallel.is_main_process():
        with open(out, "w") as f:
            json.dump(result, f)
    """
)


def test_two_processes_train_like_one(tmp_path):
    """jax.distributed for real: two processes on this machine (coordinator on 127.0.0.1, one CPU
    device each, gradients all-reduced through gloo) take FM and path-gradient steps of the EGNN
    on a batch sharded across them; the parameters equal a one-process run."""
    import json
    import socket

    import numpy as np

    script = tmp_path / "two_process.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    cwd = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workers = [
        subprocess.Popen([sys.executable, str(script), str(i), "2", port, str(tmp_path / "two.json")], cwd=cwd, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]  # fmt: skip
    for w in workers:
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err[-3000:]
    single = subprocess.run([sys.executable, str(script), "0", "1", port, str(tmp_path / "one.json")], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    two, one = (json.loads((tmp_path / f).read_text()) for f in ("two.json", "one.json"))
    for name in ("FM", "PG"):
        np.testing.assert_allclose(two[name]["losses"], one[name]["losses"], rtol=1e-5, err_msg=name)
        for a, b in zip(one[name]["params"], two[name]["params"]):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6, err_msg=name)
