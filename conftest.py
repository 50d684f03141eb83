"""Root conftest: shared fixtures and markers for every package's tests (from soaes_core.testing)."""

pytest_plugins = ["soaes_core.testing.fixtures"]
