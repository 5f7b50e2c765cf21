"""Where a KEK comes from: bytes (a Secret's value, a file, a variable) or a PKCS#11 token.

One reading of KEK sources for the operator and the CLI, so both accept the same forms,
spot the same weak keys and say the same things when a source is wrong.  The operator
reads a Secret's bytes through Kubernetes and hands them to :func:`secret_kek`; the CLI
names a source with a flag (:func:`from_spec`: ``file:PATH``, ``env:NAME``,
``pkcs11:...``).  The only I/O is reading the files and environment variables a source
names, and, for PKCS#11, the token.  Messages name the source, never a key or a PIN.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from rotation_operator.crypto import codec
from rotation_operator.crypto.kek import Kek, SecretKek
from rotation_operator.errors import ConfigError, KekError

#: Called with a source's description when its bytes look like text (a weak KEK).
WeakFn = Callable[[str], None]
#: The fields of a ``pkcs11:`` source that must be there (besides a PIN source).
PKCS11_FIELDS = ("module", "token", "key")


def _ignore(source: str) -> None:
    pass


def secret_kek(raw: bytes, source: str, *, on_weak: WeakFn = _ignore) -> SecretKek:
    """The KEK in ``raw`` (32 raw bytes, 64 hex characters or base64 of 32 bytes), named
    ``source`` in its description and in errors (:class:`KekFormatError`).

    ``on_weak(source)`` is called first when the bytes are 32 printable characters, taken
    as raw bytes: a passphrase-like key (:func:`codec.kek_looks_like_text`)."""
    if codec.kek_looks_like_text(raw):
        on_weak(source)
    return SecretKek(codec.parse_kek(raw, source), source)


def pkcs11_kek(module: str, token_label: str, key_label: str, pin: bytes | str) -> Kek:
    """The AES-256 KEK labelled ``key_label`` on the token labelled ``token_label``, through
    the PKCS#11 ``module``; surrounding whitespace of ``pin`` (a Secret's value, a file)
    is not part of it."""
    from rotation_operator.crypto.pkcs11 import (
        Pkcs11Kek,  # the PKCS#11 binding only where it is used
    )
    return Pkcs11Kek(module, token_label, key_label, pin.strip())


def from_file(path: Path, flag: str, *, on_weak: WeakFn = _ignore) -> SecretKek:
    """The KEK in the file at ``path`` (given with ``flag``, e.g. ``--kek-file``)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise KekError(f"cannot read {flag} {path}: {exc.strerror}") from None
    return secret_kek(raw, f"{flag} {path}", on_weak=on_weak)


def from_env(name: str, *, on_weak: WeakFn = _ignore,
             environ: Mapping[bytes, bytes] | None = None) -> SecretKek:
    """The KEK in the environment variable ``name`` (its bytes, as the shell set them)."""
    value = (os.environb if environ is None else environ).get(name.encode(), b"")
    if not value:
        raise KekError(f"no KEK: set ${name} or pass --kek-file / --kek SOURCE")
    return secret_kek(value, f"${name}", on_weak=on_weak)


def from_spec(text: str, flag: str, *, on_weak: WeakFn = _ignore,
              environ: Mapping[bytes, bytes] | None = None) -> Kek:
    """A KEK from a source spec given with ``flag``: ``file:PATH``, ``env:NAME``, or
    ``pkcs11:module=PATH,token=LABEL,key=LABEL,pin-env=NAME`` (or ``pin-file=PATH``)."""
    kind, _, rest = text.partition(":")
    if kind == "file" and rest:
        return from_file(Path(rest), flag, on_weak=on_weak)
    if kind == "env" and rest:
        return from_env(rest, on_weak=on_weak, environ=environ)
    if kind == "pkcs11":
        fields = dict(part.partition("=")[::2] for part in rest.split(",") if part)
        missing = [f for f in PKCS11_FIELDS if not fields.get(f)]
        if missing or not (fields.get("pin-env") or fields.get("pin-file")):
            raise ConfigError(f"{flag} pkcs11:... needs module=, token=, key= and pin-env= or "
                              f"pin-file= (missing: {', '.join(missing) or 'the PIN'})")
        pin = _pin(fields, flag, os.environb if environ is None else environ)
        return pkcs11_kek(fields["module"], fields["token"], fields["key"], pin)
    raise ConfigError(f"{flag} {text.split(':', 1)[0]!r}...: expected file:PATH, env:NAME or "
                      "pkcs11:module=...,token=...,key=...,pin-env=...")


def _pin(fields: Mapping[str, str], flag: str, environ: Mapping[bytes, bytes]) -> bytes:
    if fields.get("pin-file"):
        try:
            return Path(fields["pin-file"]).read_bytes().strip()
        except OSError as exc:
            raise KekError(f"cannot read the PIN file of {flag}: {exc.strerror}") from None
    value = environ.get(fields["pin-env"].encode(), b"").strip()
    if not value:
        raise KekError(f"no PIN: set ${fields['pin-env']} for {flag}")
    return value
