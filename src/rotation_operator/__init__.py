"""rotation-operator: declarative envelope-encryption key rotation for PostgreSQL.

The package is layered, each layer a subpackage that imports only the layers below it
(import-linter contracts in ``pyproject.toml``):

* :mod:`.cli` and :mod:`.operator` (Kopf): the two front ends;
* :mod:`.rotation`: prepare, decide, act (engine, run, mover, throttle, lifecycle,
  inspection), used by both front ends;
* :mod:`.library` (what applications import) and :mod:`.pkcs11kek` (a stable path to the
  PKCS#11 KEK);
* :mod:`.store`: every SQL statement (own tables, catalog, targets, locks, audit);
* :mod:`.policy` (configuration and the pure decision layer) and :mod:`.crypto` (the value
  and wrap formats, key rings, KEK sources, PKCS#11): no database, no Kubernetes;
* :mod:`.errors` (the one hierarchy) and :mod:`.faults` (named fault points).
"""

__version__ = "0.1.0"
