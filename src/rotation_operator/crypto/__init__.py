"""The crypto layer: every byte of the value and wrap formats, key rings and KEK sources.

Pure but for ``os.urandom`` and, for :mod:`.pkcs11`, the token: no SQL, no Kubernetes.
"""
