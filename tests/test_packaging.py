"""zoo outside its checkout: the wheel installed into a fresh virtual environment runs the
console scripts from an unrelated folder, with the configs, the model index, the released
checkpoints and the data it carries. Slow (a wheel build and two short runs); .ci/run runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from zoo import resources

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin folder, environment) with the freshly built wheel installed; the third-party
    dependencies come from this interpreter's site-packages (no network, no second download)."""
    root = tmp_path_factory.mktemp("packaging")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ZOO_MODELS", "ZOO_GIN_PATH")}
    env.update(ZOO_CACHE=str(root / "cache"), JAX_PLATFORMS="cpu")
    wheels = root / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(resources.PACKAGE.parent)],
        check=True, capture_output=True, text=True, env=env,
    )  # fmt: skip
    (wheel,) = wheels.glob("zoo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("zoo/_shipped/gin/gmm_fm.gin", "zoo/_shipped/assets/models.toml", "zoo/_shipped/assets/models/gmm_fm.tar",
                    "zoo/_shipped/assets/ad2/alanine-dipeptide.pdb", "zoo/_shipped/assets/data/lj13/manifest.json",
                    "zoo/_shipped/assets/data/lj13/train/positions/.zarray"):  # fmt: skip
        assert shipped in names, shipped
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
    bin_dir = venv / "bin"
    site = Path(subprocess.check_output([bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True, env=env).strip())
    subprocess.run([bin_dir / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, env=env, cwd=root)
    # Then the dependencies, as a path entry rather than a site dir: this environment's own
    # editable-install hook for zoo is not loaded (and, added before, pip would have taken
    # that install for this one and installed nothing).
    (site / "zoo_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return bin_dir, env, root


def _run(installed, *args):
    bin_dir, env, root = installed
    work = root / "elsewhere"
    work.mkdir(exist_ok=True)
    proc = subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, work


def test_the_installed_package_is_the_wheel_not_the_checkout(installed):
    proc, _ = _run(installed, "python", "-c", "import zoo, zoo.resources as r; print(zoo.__file__); print(r.ROOT)")
    package, root = proc.stdout.split()
    assert "site-packages" in package and not package.startswith(str(resources.PACKAGE))
    assert root.endswith("zoo/_shipped")


def test_console_scripts_train_and_evaluate_from_any_folder(installed):
    _run(installed, "zoo-train", "--gin=gmm_fm.gin", "--workdir=w", "--no_progress",
         "--gin_param=train.n_steps = 20", "--gin_param=evaluation.n_samples = 64", "--gin_param=evaluation.n_target = 64")  # fmt: skip
    proc, work = _run(installed, "zoo-evaluate", "gmm_fm", "--workdir=e", "--no_progress",
                      "--gin_param=evaluation.n_samples = 64", "--gin_param=evaluation.n_target = 64")  # fmt: skip
    assert json.loads((work / "w" / "metrics.json").read_text())["n_samples_q"] == 64
    assert json.loads((work / "e" / "metrics.json").read_text())["n_samples_q"] == 64
    proc, _ = _run(installed, "zoo", "list", "--models")
    assert "gmm_fm" in proc.stdout and "lj13_otfm_pg" in proc.stdout
    proc, _ = _run(installed, "zoo-download", "gmm_fm")
    assert "cache" in proc.stdout
