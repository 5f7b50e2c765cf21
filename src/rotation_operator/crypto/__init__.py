"""The crypto layer: every byte of the value and wrap formats, key rings and KEK sources.

Pure but for ``os.urandom``, the files and variables :mod:`.sources` is told to read, and,
for :mod:`.pkcs11`, the token: no SQL, no Kubernetes.  :mod:`.codec` is the one place the
byte layouts are written down.
"""
