"""The Kubernetes layer: thin Kopf handlers over the engine.

``handlers`` (Kopf decorators and the one error boundary) → ``workflow`` (read Secrets,
initialise, rotate, write status) → :mod:`rotation_operator.rotation.engine`.  ``decisions`` and
``conditions`` are pure so the "should we act?" logic is tested without a cluster.
"""
