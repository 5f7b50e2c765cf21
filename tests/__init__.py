"""Test suite; a package so ``pytest_plugins = ["tests.fixtures..."]`` resolves from the root."""
