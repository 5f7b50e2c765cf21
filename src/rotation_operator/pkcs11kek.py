"""Stable public import path of the PKCS#11 KEK (:mod:`rotation_operator.crypto.pkcs11`)."""

from rotation_operator.crypto.pkcs11 import (
    FINGERPRINT_LABEL,
    HSMError,
    HSMKeyMissing,
    HSMKeyUnsuitable,
    HSMLoginFailed,
    HSMModuleMissing,
    HSMTokenMissing,
    Pkcs11Kek,
    cmac_fingerprint,
)

__all__ = [
    "FINGERPRINT_LABEL",
    "HSMError",
    "HSMKeyMissing",
    "HSMKeyUnsuitable",
    "HSMLoginFailed",
    "HSMModuleMissing",
    "HSMTokenMissing",
    "Pkcs11Kek",
    "cmac_fingerprint",
]
