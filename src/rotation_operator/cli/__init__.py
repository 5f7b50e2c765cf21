"""The ``rotation-operator`` command line: break-glass and non-Kubernetes use.

:mod:`.parser` (flags), :mod:`.commands` (one function per subcommand), :mod:`.output`
(text and JSON), :mod:`.exits` (:class:`ExitStatus`); :func:`main` ties them together.
"""

from rotation_operator.cli.app import main
from rotation_operator.cli.exits import ExitStatus, as_package_error

__all__ = ["ExitStatus", "as_package_error", "main"]
