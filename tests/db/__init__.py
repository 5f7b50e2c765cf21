"""Tests against the real PostgreSQL harness (marker ``db``)."""
