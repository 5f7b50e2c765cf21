"""Tests of the harness itself (``hack/testenv/testenv.py``), marker ``harness``."""
