"""Every shipped gin file parses, and the ones that define an experiment build their target
and flow (a typo in a rarely used config fails here, not in a user's first run)."""

from __future__ import annotations

import jax
import pytest

import gin
from zoo import config
from zoo.resources import GIN_DIR

GIN_FILES = sorted(p.name for p in GIN_DIR.glob("*.gin"))


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
