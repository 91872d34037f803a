import jax
import pytest


@pytest.fixture
def key():
    return jax.random.PRNGKey(20261125)


@pytest.fixture
def x64():
    """Run a test in float64 (for tolerances float32 cannot meet)."""
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)
