"""A KEK that lives in a hardware security module and never leaves it.

With a software KEK the key bytes sit in a Kubernetes Secret and in the operator's memory;
anyone who can read either can unwrap every DEK.  :class:`Pkcs11Kek` keeps the KEK (an
AES-256 key) inside a PKCS#11 token instead: the token itself performs the AES-256-GCM that
wraps and unwraps DEKs, and the operator only ever holds a handle to the key.

The bytes produced are *exactly* those of :func:`rotation_operator.crypto.codec.wrap_dek`
(``docs/format.md`` §1-2), so a keys table written with a software KEK can be read through
the HSM after importing the same key bytes into it, and the other way round.

The KEK fingerprint of ``docs/format.md`` §3 is an HMAC of the key, which a token holding a
non-extractable AES key cannot compute portably; this provider uses AES-CMAC instead
(:func:`cmac_fingerprint`, ``cmac:`` prefix), which the token computes and software can
reproduce from the key bytes.

The key must be ``CKA_SENSITIVE`` and not ``CKA_EXTRACTABLE`` (checked at open; PKCS#11 lets
neither be undone later), and the token must reject a forged GCM tag (tried at open).  Only
an authentication failure of the value is :class:`InvalidToken`; a token that fails is
retried a few times, then :class:`HSMError` (retryable).  A token that answers a forged tag
with the same code as a device fault (``CKR_GENERAL_ERROR``: SoftHSM2) has each such answer
checked against a round trip of a fresh DEK: only a value that keeps failing on a token that
works is a bad ciphertext.

PKCS#11 login state is per token *and per process*: a second ``C_Login`` fails with
``CKR_USER_ALREADY_LOGGED_IN`` and one ``C_Logout`` logs every session out.  So every
:class:`Pkcs11Kek` on the same token in this process shares one logged-in session (and its
lock); later openers must present the same PIN, which is checked against a keyed digest.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import pkcs11
from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import algorithms
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11

from rotation_operator.crypto import codec
from rotation_operator.errors import InvalidToken, KekError

if TYPE_CHECKING:
    from pkcs11._pkcs11 import lib as Library

__all__ = [
    "ATTEMPTS",
    "FINGERPRINT_LABEL",
    "FaultHook",
    "HSMError",
    "HSMKeyMissing",
    "HSMKeyUnsuitable",
    "HSMLoginFailed",
    "HSMModuleMissing",
    "HSMTokenMissing",
    "Pkcs11Kek",
    "cmac_fingerprint",
]

#: The constant the KEK's AES-CMAC is computed over to name it.
FINGERPRINT_LABEL = b"rotation-operator/kek-fingerprint/cmac/v1"
_FINGERPRINT_PREFIX = "cmac:"
_FINGERPRINT_HEX_CHARS = 16
_TAG_BITS = codec.TAG_SIZE * 8
_REQUIRED_MECHANISMS = (Mechanism.AES_GCM, Mechanism.AES_CMAC)
_REQUIRED_USAGE = (Attribute.ENCRYPT, Attribute.DECRYPT, Attribute.SIGN)
#: Attribute, the value a KEK must have, what the message says when it has the other one.
_PROTECTION = (
    (Attribute.SENSITIVE, True, "not sensitive (CKA_SENSITIVE=false: CKA_VALUE can be read)"),
    (Attribute.EXTRACTABLE, False, "extractable (CKA_EXTRACTABLE=true: it can be wrapped out)"),
)

#: What a token answers when a GCM open does not authenticate, and nothing else: the value,
#: not the token, is wrong.  CKR_AEAD_DECRYPT_FAILED (0x35, PKCS#11 3.0) is not mapped by
#: python-pkcs11: see :func:`_is_bad_ciphertext`.
_BAD_CIPHERTEXT = (
    p11.EncryptedDataInvalid,
    p11.EncryptedDataLenRange,
    p11.DataInvalid,
    p11.DataLenRange,
)
#: Codes that say "it failed" without saying why: a device fault, or (SoftHSM2 answers a
#: forged tag with CKR_GENERAL_ERROR) a bad value.  Which one is found out, never assumed.
_AMBIGUOUS = (p11.GeneralError, p11.FunctionFailed)
#: Token calls per operation before an :class:`HSMError`, and the pauses between them.
ATTEMPTS = 3
_BACKOFF_SECONDS = (0.05, 0.2)
_UNMAPPED_AEAD_DECRYPT_FAILED = "Unmapped error code 0x35"
_LOGIN_ERRORS = (
    p11.PinIncorrect,
    p11.PinInvalid,
    p11.PinLenRange,
    p11.PinExpired,
    p11.PinLocked,
    p11.UserPinNotInitialized,
)


# --- errors ----------------------------------------------------------------------------


class HSMModuleMissing(KekError):
    """The PKCS#11 module (shared library) cannot be loaded or initialised."""

    reason = "HSMModuleMissing"
    retryable = True


class HSMTokenMissing(KekError):
    """No token (or more than one) carries the configured label."""

    reason = "HSMTokenMissing"
    retryable = True


class HSMLoginFailed(KekError):
    """The token refused the PIN (wrong, locked, expired, not set)."""

    reason = "HSMLoginFailed"
    retryable = True


class HSMKeyMissing(KekError):
    """No secret key (or more than one) carries the configured label on the token."""

    reason = "HSMKeyMissing"
    retryable = True


class HSMKeyUnsuitable(KekError):
    """The key is not AES-256, may not encrypt/decrypt/sign, is not sensitive or is
    extractable, or the token lacks GCM/CMAC (or accepts a forged GCM tag)."""

    reason = "HSMKeyUnsuitable"
    retryable = True


class HSMError(KekError):
    """Any other failure reported by the PKCS#11 library (device removed, session lost,
    ``CKR_GENERAL_ERROR`` that outlasts the retries...): never a verdict on the value.

    The message names the PKCS#11 exception class only, never its arguments.
    """

    reason = "HSMError"
    retryable = True


# --- software side of the fingerprint --------------------------------------------------


def cmac_fingerprint(kek: bytes) -> str:
    """The fingerprint :attr:`Pkcs11Kek.fingerprint` reports, computed from the key bytes.

    ``"cmac:" + lowercase_hex(AES-CMAC(kek, FINGERPRINT_LABEL))[0:16]``.  Used to check, before
    importing a software KEK into a token, which fingerprint the token will report.
    """
    if not isinstance(kek, bytes | bytearray):
        raise TypeError("kek must be bytes")
    if len(kek) != codec.KEY_SIZE:
        raise ValueError(f"kek must be {codec.KEY_SIZE} bytes, got {len(kek)}")
    mac = cmac.CMAC(algorithms.AES(bytes(kek)))
    mac.update(FINGERPRINT_LABEL)
    return _format_fingerprint(mac.finalize())


def _format_fingerprint(mac: bytes) -> str:
    return _FINGERPRINT_PREFIX + mac.hex()[:_FINGERPRINT_HEX_CHARS]


# --- the key handle as this module uses it ---------------------------------------------


class _AesKey(Protocol):
    """The part of a python-pkcs11 secret key object this module calls."""

    def __getitem__(self, key: Attribute) -> Any: ...

    def encrypt(self, data: bytes, **kwargs: Any) -> bytes | Iterator[bytes]: ...

    def decrypt(self, data: bytes, **kwargs: Any) -> bytes | Iterator[bytes]: ...

    def sign(self, data: bytes, **kwargs: Any) -> bytes: ...


# --- loaded libraries and shared logged-in sessions ------------------------------------

_registry_lock = threading.Lock()
_libraries: dict[str, Library] = {}
#: Keys the PIN digests: a digest is useless outside this process.
_PIN_DIGEST_KEY = secrets.token_bytes(32)


@dataclass(eq=False)
class _Connection:
    """One logged-in session to one token, shared by every :class:`Pkcs11Kek` on it."""

    registry_key: tuple[str, int]
    session: pkcs11.Session
    pin_digest: bytes
    users: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


_connections: dict[tuple[str, int], _Connection] = {}


def _load_library(module: str) -> tuple[str, Library]:
    """Load ``module`` once per real path (python-pkcs11 cannot load a library twice)."""
    path = os.path.realpath(module)
    with _registry_lock:
        lib = _libraries.get(path)
        if lib is None:
            lib = _open_library(module, path)
            _libraries[path] = lib
    return path, lib


def _open_library(module: str, path: str) -> Library:
    if not os.path.isfile(path):
        raise HSMModuleMissing(f"PKCS#11 module {module!r} does not exist")
    try:
        return pkcs11.lib(path)
    except p11.PKCS11Error as exc:
        stage = "loaded" if type(exc) is p11.PKCS11Error else "initialised (C_Initialize)"
        raise HSMModuleMissing(
            f"PKCS#11 module {module!r} cannot be {stage}: {type(exc).__name__}"
        ) from None


def _pin_text(pin: bytes | str, context: str) -> str:
    if isinstance(pin, str):
        return pin
    try:
        return bytes(pin).decode("utf-8")
    except UnicodeDecodeError:
        raise HSMLoginFailed(f"{context}: the PIN is not valid UTF-8") from None


def _pin_digest(pin: str) -> bytes:
    return hmac.new(_PIN_DIGEST_KEY, pin.encode("utf-8"), hashlib.sha256).digest()


def _acquire_connection(path: str, lib: Library, token: pkcs11.Token, pin: str,
                        context: str) -> _Connection:
    """The shared session for ``token``, logging in if this process has none yet."""
    registry_key = (path, token.slot.slot_id)
    digest = _pin_digest(pin)
    with _registry_lock:
        conn = _connections.get(registry_key)
        if conn is None:
            conn = _Connection(registry_key, _login(lib, token, pin, context), digest)
            _connections[registry_key] = conn
        elif not hmac.compare_digest(conn.pin_digest, digest):
            raise HSMLoginFailed(
                f"{context}: the PIN differs from the one this process is logged in with")
        conn.users += 1
        return conn


def _login(lib: Library, token: pkcs11.Token, pin: str, context: str) -> pkcs11.Session:
    try:
        return token.open(user_pin=pin)
    except _LOGIN_ERRORS as exc:
        _reclaim_leaked_session(lib)
        raise HSMLoginFailed(f"{context}: the token refused the PIN ({type(exc).__name__})"
                             ) from None
    except p11.PKCS11Error as exc:
        raise _hsm_error(context, exc) from None


def _reclaim_leaked_session(lib: Library) -> None:
    """Close the session python-pkcs11 leaves open when ``C_Login`` fails.

    ``Token.open`` calls ``C_OpenSession`` then ``C_Login`` and loses the handle if the
    login raises; an operator retrying a wrong PIN every minute would exhaust the HSM's
    sessions.  Only done while this process has no session on the library (C_Finalize
    closes them all).  Called with ``_registry_lock`` held.
    """
    if any(lib is _libraries.get(key[0]) for key in _connections):
        return
    with suppress(p11.PKCS11Error):  # best effort: the login error is what matters
        lib.reinitialize()


def _release_connection(conn: _Connection) -> None:
    with _registry_lock:
        conn.users -= 1
        if conn.users > 0:
            return
        del _connections[conn.registry_key]
        # C_Logout + C_CloseSession; the token may be gone already, leaving nothing to free
        with conn.lock, suppress(p11.PKCS11Error):
            conn.session.close()


def _find_token(lib: Library, token_label: str, slot_description: str | None,
                context: str) -> pkcs11.Token:
    tokens = [slot.get_token() for slot in lib.get_slots(token_present=True)
              if slot_description is None or slot.slot_description == slot_description]
    matches = [token for token in tokens if token.label == token_label]
    if len(matches) == 1:
        return matches[0]
    where = "" if slot_description is None else f" in slot {slot_description!r}"
    if not matches:
        raise HSMTokenMissing(f"{context}: no token labelled {token_label!r}{where} "
                              f"({len(tokens)} token(s) present)")
    raise HSMTokenMissing(f"{context}: {len(matches)} tokens are labelled {token_label!r}"
                          f"{where}; set the slot description to choose one")


def _find_key(session: pkcs11.Session, key_label: str, context: str) -> _AesKey:
    found = list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY,
                                      Attribute.LABEL: key_label}))
    if not found:
        raise HSMKeyMissing(f"{context}: no secret key labelled {key_label!r} on the token")
    if len(found) > 1:
        raise HSMKeyMissing(f"{context}: {len(found)} secret keys are labelled "
                            f"{key_label!r}; labels must be unique")
    return cast(_AesKey, found[0])


def _check_key(key: _AesKey, context: str) -> None:
    """Refuse anything but a sensitive, non-extractable AES-256 key allowed to encrypt,
    decrypt and sign."""
    if key[Attribute.KEY_TYPE] != KeyType.AES:
        raise HSMKeyUnsuitable(f"{context}: the key is not an AES key")
    length = key[Attribute.VALUE_LEN]
    if length != codec.KEY_SIZE:
        raise HSMKeyUnsuitable(
            f"{context}: the key is {length * 8}-bit AES; a KEK must be AES-256")
    missing = [attr.name for attr in _REQUIRED_USAGE if not key[attr]]
    if missing:
        names = ", ".join(f"CKA_{name}" for name in missing)
        raise HSMKeyUnsuitable(f"{context}: the key lacks {names}")
    exposed = [text for attr, want, text in _PROTECTION if bool(key[attr]) is not want]
    if exposed:
        raise HSMKeyUnsuitable(
            f"{context}: the key is {' and '.join(exposed)}, so its bytes can leave the "
            "token; generate a new key with CKA_SENSITIVE=true and CKA_EXTRACTABLE=false "
            "(pkcs11-tool --keygen --sensitive, without --extractable) and rekey to it")


def _check_mechanisms(token: pkcs11.Token, context: str) -> None:
    offered = token.slot.get_mechanisms()
    missing = [mech.name for mech in _REQUIRED_MECHANISMS if mech not in offered]
    if missing:
        names = ", ".join(f"CKM_{name}" for name in missing)
        raise HSMKeyUnsuitable(f"{context}: the token does not offer {names}")


def _hsm_error(context: str, exc: p11.PKCS11Error) -> HSMError:
    return HSMError(f"{context}: {type(exc).__name__}")


def _is_bad_ciphertext(exc: p11.PKCS11Error) -> bool:
    if isinstance(exc, _BAD_CIPHERTEXT):
        return True
    return type(exc) is p11.PKCS11Error and exc.args == (_UNMAPPED_AEAD_DECRYPT_FAILED,)


def _gcm(nonce: bytes | bytearray, aad: bytes) -> pkcs11.GCMParams:
    # python-pkcs11 passes a pointer to ``nonce``'s buffer as CK_GCM_PARAMS.pIv; a bytearray
    # (which it accepts, though typed ``bytes``) lets a token legitimately write into it.
    return pkcs11.GCMParams(nonce, aad, _TAG_BITS)  # type: ignore[arg-type]


def _as_bytes(result: bytes | Iterator[bytes]) -> bytes:
    return result if isinstance(result, bytes) else b"".join(result)


def _pause(attempt: int) -> None:
    """Before retry ``attempt`` (0 is the first call: no pause)."""
    if attempt:
        time.sleep(_BACKOFF_SECONDS[min(attempt, len(_BACKOFF_SECONDS)) - 1])


# --- the provider ----------------------------------------------------------------------


#: Called before every token call with its name (``"sign"``, ``"encrypt"``, ``"decrypt"``);
#: it may raise a python-pkcs11 exception as the token would.  A seam for fault-injection
#: tests (a device that fails once, or keeps failing); never set in production.
FaultHook = Callable[[str], None]
_T = TypeVar("_T")


class Pkcs11Kek:
    """An AES-256 KEK held by a PKCS#11 token, addressed by module, token and key label.

    Thread-safe: every token call is made under the lock of the shared session.  The PIN
    is used to log in and then forgotten (only a keyed digest is kept to check that later
    openers of the same token present the same PIN).  ``fault``: see :data:`FaultHook`.
    """

    def __init__(self, module: str, token_label: str, key_label: str, pin: bytes | str, *,
                 slot_description: str | None = None, fault: FaultHook | None = None) -> None:
        self._module = module
        self._token_label = token_label
        self._key_label = key_label
        self._fault = fault
        self._closed = False
        context = self._context()
        path, lib = _load_library(module)
        pin_text = _pin_text(pin, context)
        with _translate_errors(context):
            token = _find_token(lib, token_label, slot_description, context)
            _check_mechanisms(token, context)
        self._conn = _acquire_connection(path, lib, token, pin_text, context)
        try:
            self._open_key(context)
        except BaseException:
            _release_connection(self._conn)
            raise

    def _open_key(self, context: str) -> None:
        with self._conn.lock, _translate_errors(context):
            key = _find_key(self._conn.session, self._key_label, context)
            _check_key(key, context)
            self._always_sensitive = bool(key[Attribute.ALWAYS_SENSITIVE])
            self._never_extractable = bool(key[Attribute.NEVER_EXTRACTABLE])
        self._key = key
        self._ambiguous_tag = self._calibrate(context)
        mac = self._retrying("sign", lambda: key.sign(FINGERPRINT_LABEL,
                                                      mechanism=Mechanism.AES_CMAC))
        self._fingerprint = _format_fingerprint(mac)

    def _calibrate(self, context: str) -> bool:
        """Open a forged value once: whether this token answers a tag that does not verify
        with an ambiguous code (:data:`_AMBIGUOUS`).  A token that accepts it is refused."""
        aad = codec.wrap_aad(1)
        nonce, sealed = self._retrying("encrypt", lambda: self._seal(os.urandom(32), aad))
        forged = sealed[:-1] + bytes([sealed[-1] ^ 1])
        try:
            self._call("decrypt", lambda: self._open(forged, nonce, aad))
        except p11.PKCS11Error as exc:
            if _is_bad_ciphertext(exc):
                return False
            if isinstance(exc, _AMBIGUOUS):
                return True
            raise _hsm_error(context, exc) from None
        raise HSMKeyUnsuitable(f"{context}: the token accepted a forged AES-GCM tag")

    # --- identity -------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        """``cmac:`` + 16 hex chars of the token's AES-CMAC of :data:`FINGERPRINT_LABEL`."""
        return self._fingerprint

    @property
    def extractable(self) -> bool:
        """Always ``False``: this provider never exports the key."""
        return False

    @property
    def always_sensitive(self) -> bool:
        """The key's ``CKA_ALWAYS_SENSITIVE``: it has been sensitive since it was made (false
        for a key imported from outside the token, or made readable then)."""
        return self._always_sensitive

    @property
    def never_extractable(self) -> bool:
        """The key's ``CKA_NEVER_EXTRACTABLE``: it was never extractable (false for an
        imported key: its bytes existed outside the token once)."""
        return self._never_extractable

    def legacy_key(self) -> bytes | None:
        """``None``: the key bytes stay in the token (legacy rows cannot be read with it)."""
        return None

    def describe(self) -> str:
        """A human name for logs and conditions, e.g. ``pkcs11 token 'rotation' key 'kek-1'``."""
        return f"pkcs11 token {self._token_label!r} key {self._key_label!r}"

    def _context(self) -> str:
        return f"PKCS#11 module {self._module!r} {self.describe()}"

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return (f"<Pkcs11Kek module={self._module!r} token={self._token_label!r} "
                f"key={self._key_label!r}{state}>")

    # --- DEK wrapping ---------------------------------------------------------------

    def wrap(self, dek: bytes, version: int) -> bytes:
        """Wrap ``dek`` for key ``version`` in the token; same bytes as ``codec.wrap_dek``.

        A token error is retried (:data:`ATTEMPTS` calls, a fresh nonce each), then
        :class:`HSMError`."""
        if not isinstance(dek, bytes | bytearray):
            raise TypeError("dek must be bytes")
        if len(dek) != codec.KEY_SIZE:
            raise ValueError(f"dek must be {codec.KEY_SIZE} bytes, got {len(dek)}")
        aad = codec.wrap_aad(version)
        nonce, sealed = self._retrying("encrypt", lambda: self._seal(bytes(dek), aad))
        if len(sealed) != codec.WRAPPED_BODY_SIZE:
            raise HSMError(f"{self._context()}: the token returned a GCM result of "
                           f"{len(sealed)} bytes, expected {codec.WRAPPED_BODY_SIZE}")
        return codec.build(nonce, sealed)

    def unwrap(self, wrapped: bytes, version: int) -> bytes:
        """Unwrap the DEK of ``version``; :class:`InvalidToken` if it does not authenticate.

        As ``codec.unwrap_dek``: wrong KEK, wrong version, tampering and wrong length all
        raise the same opaque error.  A token that fails (unreachable, ``CKR_GENERAL_ERROR``
        that a retry does not clear) raises :class:`HSMError`, never :class:`InvalidToken`.
        """
        self._check_open()
        dek = self._gcm_open(codec.parse(wrapped, size=codec.WRAPPED_SIZE),
                             codec.wrap_aad(version))
        if dek is None or len(dek) != codec.KEY_SIZE:
            raise InvalidToken()  # raised outside any except: no PKCS#11 cause attached
        return dek

    def _gcm_open(self, sealed: codec.Sealed, aad: bytes) -> bytes | None:
        """The token's AES-GCM open of a format-v1 value, ``None`` if it does not verify.

        Only :data:`_BAD_CIPHERTEXT` is the value's fault.  Anything else is retried with a
        pause, then :class:`HSMError`; on a token that answers a forged tag ambiguously
        (:meth:`_calibrate`), an ambiguous answer is the value's only if the token then
        round-trips a fresh DEK (:meth:`_works`) and gives the same answer again.
        """
        def open_value() -> bytes:
            return self._open(sealed.body, sealed.nonce, aad)

        failure: p11.PKCS11Error | None = None
        for attempt in range(ATTEMPTS):
            _pause(attempt)
            try:
                return self._call("decrypt", open_value)
            except p11.PKCS11Error as exc:
                failure = exc
            if _is_bad_ciphertext(failure):
                return None
            if self._ambiguous_tag and isinstance(failure, _AMBIGUOUS) and self._works():
                try:
                    return self._call("decrypt", open_value)
                except p11.PKCS11Error as exc:
                    failure = exc
                if _is_bad_ciphertext(failure) or isinstance(failure, _AMBIGUOUS):
                    return None  # the token works; this value does not open
        assert failure is not None
        raise _hsm_error(self._context(), failure) from None

    def _works(self) -> bool:
        """Whether the token wraps and unwraps a fresh DEK right now (a health check)."""
        dek, aad = os.urandom(codec.KEY_SIZE), codec.wrap_aad(1)
        try:
            nonce, sealed = self._call("encrypt", lambda: self._seal(dek, aad))
            back = self._call("decrypt", lambda: self._open(sealed, nonce, aad))
        except p11.PKCS11Error:
            return False
        return hmac.compare_digest(back, dek)

    def _seal(self, data: bytes, aad: bytes) -> tuple[bytes, bytes]:
        """AES-GCM in the token under a fresh nonce: (the nonce used, ciphertext ‖ tag)."""
        # Writable: some tokens (AWS CloudHSM) ignore the caller's IV and write the one they
        # generated into pIv, so what is in the buffer afterwards is the IV actually used.
        nonce = bytearray(os.urandom(codec.V1.nonce_size))
        sealed = _as_bytes(self._key.encrypt(data, mechanism=Mechanism.AES_GCM,
                                             mechanism_param=_gcm(nonce, aad)))
        return bytes(nonce), sealed

    def _open(self, body: bytes, nonce: bytes, aad: bytes) -> bytes:
        return _as_bytes(self._key.decrypt(body, mechanism=Mechanism.AES_GCM,
                                           mechanism_param=_gcm(nonce, aad)))

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.describe()} is closed")

    def _call(self, op: str, call: Callable[[], _T]) -> _T:
        """One token call under the shared session's lock (python-pkcs11 errors raised)."""
        with self._conn.lock:
            if self._fault is not None:
                self._fault(op)
            return call()

    def _retrying(self, op: str, call: Callable[[], _T]) -> _T:
        """:meth:`_call`, retried on any PKCS#11 error; :class:`HSMError` after
        :data:`ATTEMPTS` calls (the lock is not held during the pauses)."""
        self._check_open()
        failure: p11.PKCS11Error | None = None
        for attempt in range(ATTEMPTS):
            _pause(attempt)
            try:
                return self._call(op, call)
            except p11.PKCS11Error as exc:
                failure = exc
        assert failure is not None
        raise _hsm_error(self._context(), failure) from None

    # --- lifetime -------------------------------------------------------------------

    def close(self) -> None:
        """Give up this handle; the shared session logs out when its last user closes."""
        if self._closed:
            return
        self._closed = True
        _release_connection(self._conn)

    def __enter__(self) -> Pkcs11Kek:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@contextmanager
def _translate_errors(context: str) -> Iterator[None]:
    """Turn any python-pkcs11 exception into :class:`HSMError` naming its class only."""
    try:
        yield
    except p11.PKCS11Error as exc:
        raise _hsm_error(context, exc) from None
