"""rotation-operator: declarative envelope-encryption key rotation for PostgreSQL.

The package is layered so each part can be used and tested on its own:

* :mod:`.crypto` and :mod:`.keyring` are pure (no I/O but ``os.urandom``): the value
  format, DEK wrapping, KEK parsing.
* :mod:`.store` owns every SQL statement: key tables, rotation records, the hash-chained
  audit log, counts over the targets.
* :mod:`.engine` is the rotation workflow over both, used by the CLI and the operator.
* :mod:`.library` is what applications import to encrypt and decrypt with the same keys.
* :mod:`.operator` is the thin Kopf layer.
"""

__version__ = "0.1.0"
