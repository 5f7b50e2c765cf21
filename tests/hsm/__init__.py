"""Tests of the PKCS#11 KEK provider against a private SoftHSM2 token (``softhsm`` fixture)."""
