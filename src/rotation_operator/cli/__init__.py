"""The ``rotation-operator`` command line: break-glass and non-Kubernetes use."""

from rotation_operator.cli.commands import main

__all__ = ["main"]
