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


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test file.

    Every executable XLA's CPU backend keeps alive holds a few memory mappings of JIT code.
    The whole suite compiles tens of thousands of programs in one process; kept, they pass
    Linux's default limit of 65 530 mappings per process (vm.max_map_count), after which
    the next compilation's mmap fails and XLA segfaults instead of raising.
    """
    yield
    jax.clear_caches()
