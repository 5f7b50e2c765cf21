"""The rotation layer: prepare, decide, act, for the CLI and the operator alike.

The engine, the batch mover and its workers, the throttle, key lifecycle and the read-only
inspection (status snapshots, verify).  No Kubernetes.
"""
