"""The Kubernetes layer: thin Kopf handlers over the rotation layer.

``handlers`` (Kopf decorators and the one error boundary) → ``workflow`` (a reconcile) and
``refresh`` (the timer) → :mod:`rotation_operator.rotation.engine`.  ``spec`` reads a
policy's spec once; ``secrets`` reads the Secrets it names; ``control`` is what a running
rotation obeys between batches; ``status`` (pure) says what the status shows and
``writer`` writes it; ``kube`` holds the few API calls, ``leader`` the Lease, ``metrics``,
``logs``, ``settings`` and ``runner`` the process around them.
"""
