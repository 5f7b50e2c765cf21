"""The store layer: every SQL statement, over the operator's own tables and the catalog.

Connections, the one translation of database errors, keys, rotations, coverage, audit and
the rotation lock.  No Kubernetes.
"""
