"""Every shipped gin file parses, and the ones that define an experiment build their target
and flow (a typo in a rarely used config fails here, not in a user's first run)."""

from __future__ import annotations

import jax
import pytest

import gin
from zoo.experiments import config
from zoo.pretrained import load_index
from zoo.resources import GIN_DIR

GIN_FILES = sorted(p.name for p in GIN_DIR.glob("*.gin"))
SHIPPED = load_index()


def _bound(name: str) -> bool:
    try:
        gin.query_parameter(name)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("name", GIN_FILES)
def test_every_gin_file_parses_and_builds(name):
    config.parse([name], [])
    if not _bound("make_system.system"):  # data generation and partial configs: parsing is the check
        return
    system = config.make_system()
    if _bound("make_flow.field"):
        flow = config.make_flow(system, key=jax.random.PRNGKey(0))
        assert flow.dim == system.dim


def _pretrained_name(name: str) -> str | None:
    """The model a config starts from: a fine-tuning's, or a comparison's from a pretrained model."""
    config.parse([name], [])
    for selector in ("finetune.pretrained", "compare.pretrained"):
        if _bound(selector):
            return gin.query_parameter(selector)
    return None


FINETUNING = [(name, model) for name in GIN_FILES if (model := _pretrained_name(name)) in SHIPPED]


@pytest.mark.parametrize("name, model", FINETUNING)
def test_every_finetuning_config_builds_the_flow_of_its_pretrained_model(name, model):
    """As tools/finetune and tools/compare lay it (the checkpoint's stored config underneath the
    file), each fine-tuning config (and comparison from a pretrained model) builds a flow the released checkpoint loads into: a file that bound
    another architecture (lj13_pg.gin did, through lj13_common.gin, once lj13_eqotfm became
    an h32 model) fails here instead of after a user's first evaluation."""
    from zoo import checkpoint
    path, stored = config.stored_config(model)
    config.parse([name], [], config_str=stored)
    flow = config.make_flow(config.make_system(), key=jax.random.PRNGKey(0))
    restored = checkpoint.load_checkpoint(path, model_like=flow)
    assert jax.tree.structure(restored.model) == jax.tree.structure(flow)


@pytest.mark.parametrize("name", [n for n in GIN_FILES if n.endswith("_common.gin")])
def test_every_system_config_loads_its_data(name):
    """The data set each system's config names (the shipped slices in assets/data) loads,
    passes its sha256 checks and has the target's shape, with forces for path gradients."""
    config.parse([name], [])
    system = config.make_system()
    dataset = config.make_dataset(system)
    for split in (dataset.train, dataset.val, dataset.test):
        assert len(split) > 0 and split.positions.shape[1:] == (system.dim,)
        assert split.forces is None or split.forces.shape == split.positions.shape
    if name.startswith(("lj", "dw", "ad2")):
        assert dataset.train.forces is not None
