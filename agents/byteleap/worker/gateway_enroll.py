"""The worker's enrollment with a gateway, and the certificate it keeps (docs/gateway.md).

Enrolling (:func:`enroll`):

1. the worker asks its miner for a grant (``GatewayEnrollRequest``, see :mod:`.link`); the grant
   (a one-time token, the enrollment and worker URLs, the gateway's CA) came from a validator
   that pins that CA, over authenticated links only;
2. it makes a fresh ECDSA P-256 key and a CSR whose subject is exactly ``CN=<worker_id>``, and
   proves the request with its Ed25519 worker key: the signature over
   :func:`~byteleap.core.gateway_protocol.enroll_proof_message` (the token's hash and the CSR);
3. it POSTs ``{worker_id, worker_public_key, csr_pem, proof}`` to the grant's ``enroll_url``
   with the token as bearer, over HTTPS whose only trust root is the grant's CA (no system CA,
   host names checked, no redirects);
4. it checks the certificate it gets: its own new key, ``CN=<worker_id>``, issued by that CA,
   still valid; then stores everything.

The state (:class:`GatewayEnrollment`) lives in ``<state_dir>/gateway/``: ``key.pem`` (0600),
``cert.pem``, ``ca.pem`` and ``gateway.json`` (``gateway_id``, ``ws_url``, ``not_after``,
``enrolled_at``). It is replaced as a whole, never edited in place: ``gateway`` is a symbolic
link to a generation directory beside it (``.gateway-<random>``, 0700); a new generation is
written and fsynced, the link is switched to it with one ``rename`` and the old generation is
removed. A reader (or a crash) sees the old state or the new one, never a key of one certificate
next to another certificate, and ``gateway/`` never goes missing. Loading only reads; what an
interrupted replacement left (a generation never linked, a temporary link) is removed by the next
replacement. A plain ``gateway`` directory is read as well, and replaced by a link at the next
write.

Renewal happens in the gateway session: :meth:`GatewayEnrollment.renewal_request` makes the next
key and a ``RenewCert`` (proof bound to the session id), :meth:`GatewayEnrollment.store_renewed`
checks the ``CertRenewed`` against that key and swaps the state. Every failure is a
:class:`GatewayEnrollError` with one clear line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

import aiohttp
import msgspec
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from byteleap.core import gateway_protocol as gp
from byteleap.core import wire
from byteleap.core.files import PrivateFileError, read_private_file, write_exclusive
from byteleap.core.identity import WorkerKey

from .link import MinerRequestError

__all__ = [
    "CA_FILE",
    "CERT_FILE",
    "ENROLL_TIMEOUT_S",
    "GATEWAY_DIR",
    "KEY_FILE",
    "STATE_FILE",
    "GatewayEnrollError",
    "GatewayEnrollment",
    "enroll",
    "enroll_with_grant",
]

GATEWAY_DIR: Final = "gateway"
KEY_FILE: Final = "key.pem"
CERT_FILE: Final = "cert.pem"
CA_FILE: Final = "ca.pem"
STATE_FILE: Final = "gateway.json"
_GENERATION_PREFIX: Final = ".gateway-"
_LINK_PREFIX: Final = ".gateway.link-"
ENROLL_TIMEOUT_S: Final = 30.0
"""The whole ``POST /v1/enroll`` exchange with the gateway."""
_MAX_ANSWER_BYTES: Final = 64 * 1024
_MAX_FILE_BYTES: Final = 64 * 1024
_RENEW_FRACTION: Final = 1 / 3
_SHOWN_CHARS: Final = 200
_ERROR_CODE: Final = re.compile(r"\A[a-z0-9_]{1,64}\Z")
_GATEWAY_ID: Final = re.compile(r"\A[0-9a-f]{32}\Z")


class GatewayEnrollError(Exception):
    """Enrollment failed or the stored state is unusable; the message says why in one line.

    ``code`` groups causes: ``no_grant`` (the miner gave no token: ``wire_code`` is its wire
    code, or None when it never answered), the gateway's own error code when it refused (e.g.
    ``token_expired``, ``token_used``, ``worker_revoked``, ``proof_invalid``), ``tls`` (the
    gateway's certificate does not chain to the grant's CA), ``unreachable``, ``bad_answer``
    (a grant or a certificate that does not check out), ``state`` (the files under
    ``<state_dir>/gateway``).
    """

    def __init__(self, message: str, *, code: str, wire_code: wire.ErrorCode | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.wire_code = wire_code


class _StateFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    gateway_id: str
    ws_url: str
    not_after: float
    enrolled_at: float


_STATE_DECODER: Final = msgspec.json.Decoder(_StateFile)


def _shown(text: str) -> str:
    clean = "".join(c if " " <= c <= "~" else "?" for c in text)
    return clean if len(clean) <= _SHOWN_CHARS else clean[:_SHOWN_CHARS] + "..."


# --------------------------------------------------------------------------------------------
# Keys, CSRs and certificates


def _new_tls_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _csr(key: ec.EllipticCurvePrivateKey, worker_id: str) -> x509.CertificateSigningRequest:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, worker_id)])
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())


def _public_der(key: ec.EllipticCurvePrivateKey | x509.Certificate) -> bytes:
    public = key.public_key()
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load_key(data: bytes, where: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise GatewayEnrollError(f"{where} is not a PEM private key", code="state") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise GatewayEnrollError(f"{where} is not an ECDSA key", code="state")
    return key


def _load_cert(pem: str | bytes, where: str, code: str) -> x509.Certificate:
    data = pem.encode("ascii", "replace") if isinstance(pem, str) else pem
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise GatewayEnrollError(f"{where} is not a PEM certificate", code=code) from None


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if len(names) == 1 else ""


def _check_issued(cert: x509.Certificate, ca: x509.Certificate, where: str, code: str) -> None:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        raise GatewayEnrollError(f"{where} was not issued by the gateway's CA", code=code) from None


def _check_worker_cert(
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    worker_id: str,
    where: str,
    code: str,
) -> None:
    """The certificate is for ``key``, names ``worker_id`` and was issued by ``ca``."""
    if _public_der(cert) != _public_der(key):
        raise GatewayEnrollError(f"{where} does not certify this worker's TLS key", code=code)
    if _common_name(cert) != worker_id:
        raise GatewayEnrollError(
            f"{where} names {_shown(_common_name(cert))!r}, not this worker ({worker_id})",
            code=code,
        )
    _check_issued(cert, ca, where, code)


def _validity(cert: x509.Certificate) -> tuple[float, float]:
    return cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


# --------------------------------------------------------------------------------------------
# The directory, replaced as a whole


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _link_target(state_dir: Path) -> Path | None:
    """The generation ``<state_dir>/gateway`` links to; None when it is not such a link."""
    link = state_dir / GATEWAY_DIR
    if not link.is_symlink():
        return None
    target = str(link.readlink())
    if "/" in target or not target.startswith(_GENERATION_PREFIX):
        return None
    return state_dir / target


def _tidy(state_dir: Path) -> None:
    """Remove what an interrupted replacement left: every generation but the current one and
    temporary links (a crash leaves at most one of each). Only writers call it, so a reader
    never removes a generation a writer is filling."""
    if not state_dir.is_dir():
        return
    current = _link_target(state_dir)
    for entry in state_dir.iterdir():
        stale_generation = entry.name.startswith(_GENERATION_PREFIX) and entry != current
        if stale_generation or entry.name.startswith(_LINK_PREFIX):
            _remove(entry)


def _replace_state(state_dir: Path, files: dict[str, tuple[bytes, int]]) -> None:
    """Make ``<state_dir>/gateway`` hold exactly ``files`` (name -> (content, mode)), all or
    nothing: a new generation directory is written and fsynced, then the ``gateway`` link is
    switched to it in one rename, then the old generation is removed."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _tidy(state_dir)
    generation = state_dir / f"{_GENERATION_PREFIX}{secrets.token_hex(8)}"
    temporary_link = state_dir / f"{_LINK_PREFIX}{secrets.token_hex(8)}"
    current = state_dir / GATEWAY_DIR
    generation.mkdir(mode=0o700)
    try:
        for name, (data, mode) in sorted(files.items(), key=lambda item: item[0] == STATE_FILE):
            write_exclusive(generation / name, data, mode)
        _fsync_dir(generation)
        temporary_link.symlink_to(generation.name)
        if current.is_dir() and not current.is_symlink():  # a plain directory: moved aside
            current.rename(state_dir / f"{_GENERATION_PREFIX}{secrets.token_hex(8)}")
        temporary_link.replace(current)
        _fsync_dir(state_dir)
    except BaseException:
        with contextlib.suppress(OSError):
            _remove(temporary_link)
            if _link_target(state_dir) != generation:
                _remove(generation)
        raise
    with contextlib.suppress(OSError):  # replaced; a leftover goes at the next load
        _tidy(state_dir)


def _state_files(
    key_pem: bytes, cert: x509.Certificate, ca_pem: str, state: _StateFile
) -> dict[str, tuple[bytes, int]]:
    return {
        KEY_FILE: (key_pem, 0o600),
        CERT_FILE: (_pem(cert).encode("ascii"), 0o644),
        CA_FILE: (ca_pem.encode("ascii"), 0o644),
        STATE_FILE: (msgspec.json.encode(state) + b"\n", 0o644),
    }


def _read(path: Path, what: str, shown_dir: Path) -> bytes:
    """A file of the state (named in errors as ``shown_dir/<name>``)."""
    shown = shown_dir / path.name
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise GatewayEnrollError(f"{what} {shown} is missing", code="state") from None
    except OSError as exc:
        raise GatewayEnrollError(
            f"cannot read {what} {shown}: {exc.strerror or exc}", code="state"
        ) from None
    if len(data) > _MAX_FILE_BYTES:
        raise GatewayEnrollError(
            f"{what} {shown} is larger than {_MAX_FILE_BYTES} bytes", code="state"
        )
    return data


def _state_directory(state_dir: Path) -> Path:
    """The directory holding the current state: the generation ``gateway`` links to (or a
    plain ``gateway`` directory)."""
    shown = state_dir / GATEWAY_DIR
    if shown.is_symlink():
        target = _link_target(state_dir)
        if target is None:
            raise GatewayEnrollError(
                f"{shown} links to {str(shown.readlink())!r}, not to a state generation beside it",
                code="state",
            )
        if not target.is_dir() or target.is_symlink():
            raise GatewayEnrollError(f"{shown} links to a missing directory", code="state")
        return target
    if not shown.is_dir():
        raise GatewayEnrollError(f"{shown} is not a directory", code="state")
    return shown


# --------------------------------------------------------------------------------------------
# The stored enrollment


class GatewayEnrollment:
    """The worker's gateway certificate and where to use it (``<state_dir>/gateway/``).

    Built by :meth:`load` or by :func:`enroll`; :meth:`store_renewed` moves it to the renewed
    certificate in place.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        worker_id: str,
        gateway_id: str,
        ws_url: str,
        not_before: float,
        not_after: float,
        enrolled_at: float,
        ca_pem: str,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.worker_id = worker_id
        self.gateway_id = gateway_id
        self.ws_url = ws_url
        self.not_before = not_before
        self.not_after = not_after
        self.enrolled_at = enrolled_at
        self.ca_pem = ca_pem

    def __repr__(self) -> str:
        return (
            f"GatewayEnrollment(worker_id={self.worker_id!r}, gateway_id={self.gateway_id!r}, "
            f"not_after={self.not_after:.0f})"
        )

    @property
    def directory(self) -> Path:
        return self.state_dir / GATEWAY_DIR

    @property
    def key_path(self) -> Path:
        return self.directory / KEY_FILE

    @property
    def cert_path(self) -> Path:
        return self.directory / CERT_FILE

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, state_dir: Path, *, worker_id: str | None = None) -> GatewayEnrollment | None:
        """The stored enrollment, or None when there is none.

        Raises :class:`GatewayEnrollError` (code ``state``) for state that is there but
        unusable: a missing or corrupted file, a key readable by others, a certificate that is
        not for that key, not issued by the stored CA, or (``worker_id`` given) for another
        worker. The message names the file; enrolling again replaces the directory.
        """
        state_dir = Path(state_dir)
        shown = state_dir / GATEWAY_DIR
        if not shown.exists() and not shown.is_symlink():
            return None
        directory = _state_directory(state_dir)
        state_path = directory / STATE_FILE
        try:
            state = _STATE_DECODER.decode(_read(state_path, "gateway state file", shown))
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise GatewayEnrollError(
                f"gateway state file {shown / STATE_FILE} is corrupted ({_shown(str(exc))})",
                code="state",
            ) from None
        if not _GATEWAY_ID.match(state.gateway_id) or not state.ws_url.startswith("wss://"):
            raise GatewayEnrollError(
                f"gateway state file {shown / STATE_FILE} is corrupted (bad gateway_id or ws_url)",
                code="state",
            )
        key_path = directory / KEY_FILE
        try:
            key_data = read_private_file(key_path, _MAX_FILE_BYTES, what="gateway TLS key")
        except PrivateFileError as exc:
            message = str(exc).replace(str(directory), str(shown))
            raise GatewayEnrollError(message, code="state") from None
        key = _load_key(key_data, f"gateway TLS key {shown / KEY_FILE}")
        cert_path = shown / CERT_FILE
        cert = _load_cert(
            _read(directory / CERT_FILE, "gateway certificate", shown), f"{cert_path}", "state"
        )
        ca_path = shown / CA_FILE
        ca = _load_cert(_read(directory / CA_FILE, "gateway CA", shown), f"{ca_path}", "state")
        cert_worker = _common_name(cert)
        if worker_id is not None and cert_worker != worker_id:
            raise GatewayEnrollError(
                f"{cert_path} is for worker {_shown(cert_worker)!r}, not this one ({worker_id})",
                code="state",
            )
        _check_worker_cert(cert, key, ca, cert_worker, f"{cert_path}", "state")
        not_before, not_after = _validity(cert)
        return cls(
            state_dir,
            worker_id=cert_worker,
            gateway_id=state.gateway_id,
            ws_url=state.ws_url,
            not_before=not_before,
            not_after=not_after,
            enrolled_at=state.enrolled_at,
            ca_pem=_pem(ca),
        )

    @classmethod
    def create(
        cls,
        state_dir: Path,
        *,
        worker_id: str,
        key_pem: bytes,
        cert_pem: str,
        ca_pem: str,
        gateway_id: str,
        ws_url: str,
        enrolled_at: float,
    ) -> GatewayEnrollment:
        """Check a new certificate (for ``key_pem``, ``CN=<worker_id>``, issued by ``ca_pem``,
        valid after ``enrolled_at``) and store it as the enrollment, replacing any previous one
        atomically."""
        key = _load_key(key_pem, "the TLS key")
        cert = _load_cert(cert_pem, "the gateway's certificate", "bad_answer")
        ca = _load_cert(ca_pem, "the gateway's CA", "bad_answer")
        _check_worker_cert(cert, key, ca, worker_id, "the gateway's certificate", "bad_answer")
        if not _GATEWAY_ID.match(gateway_id):
            raise GatewayEnrollError(
                f"{_shown(gateway_id)!r} is not a gateway id", code="bad_answer"
            )
        if not ws_url.startswith("wss://") or not ws_url.isascii() or not ws_url.isprintable():
            raise GatewayEnrollError(
                f"the gateway's worker URL {_shown(ws_url)!r} is not wss://", code="bad_answer"
            )
        not_before, not_after = _validity(cert)
        if not_after <= enrolled_at:
            raise GatewayEnrollError(
                "the gateway's certificate has already expired", code="bad_answer"
            )
        state = _StateFile(
            gateway_id=gateway_id, ws_url=ws_url, not_after=not_after, enrolled_at=enrolled_at
        )
        state_dir = Path(state_dir)
        try:
            _replace_state(state_dir, _state_files(key_pem, cert, _pem(ca), state))
        except OSError as exc:
            raise GatewayEnrollError(
                f"cannot store the gateway certificate in {state_dir / GATEWAY_DIR}: "
                f"{exc.strerror or exc}",
                code="state",
            ) from None
        return cls(
            state_dir,
            worker_id=worker_id,
            gateway_id=gateway_id,
            ws_url=ws_url,
            not_before=not_before,
            not_after=not_after,
            enrolled_at=enrolled_at,
            ca_pem=_pem(ca),
        )

    # ------------------------------------------------------------------ use

    def ssl_context(self) -> ssl.SSLContext:
        """The client context of the mTLS session: this worker's certificate and key, the
        gateway's CA as the only trust root, host names checked, TLS 1.2 or newer."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        for attempt in range(2):
            try:
                # One generation for both files: a renewal swapping the state meanwhile cannot
                # pair the new key with the old certificate.
                directory = _state_directory(self.state_dir)
                context.load_verify_locations(cadata=self.ca_pem)
                context.load_cert_chain(directory / CERT_FILE, directory / KEY_FILE)
            except FileNotFoundError:
                if attempt == 0:  # that generation was just replaced: read the new one
                    continue
                raise GatewayEnrollError(
                    f"the gateway certificate in {self.directory} is missing", code="state"
                ) from None
            except (OSError, ssl.SSLError) as exc:
                raise GatewayEnrollError(
                    f"cannot use the gateway certificate in {self.directory}: {exc}", code="state"
                ) from None
            break
        return context

    def expired(self, now: float) -> bool:
        return now >= self.not_after

    def needs_renewal(self, now: float) -> bool:
        """Less than a third of the certificate's lifetime is left."""
        lifetime = self.not_after - self.not_before
        return now >= self.not_after - lifetime * _RENEW_FRACTION

    def renewal_request(
        self, worker_key: WorkerKey, session_id: bytes
    ) -> tuple[bytes, gp.RenewCert]:
        """A new TLS key (PEM, kept by the caller until the answer) and the ``RenewCert`` for
        it, proven by the worker key over this session's id."""
        if worker_key.worker_id != self.worker_id:
            raise GatewayEnrollError(
                f"the worker key is {worker_key.worker_id}'s, the certificate {self.worker_id}'s",
                code="state",
            )
        key = _new_tls_key()
        csr = _csr(key, self.worker_id)
        csr_der = csr.public_bytes(serialization.Encoding.DER)
        proof = worker_key.sign(gp.renew_proof_message(session_id, csr_der))
        csr_pem = csr.public_bytes(serialization.Encoding.PEM).decode("ascii")
        return _key_pem(key), gp.RenewCert(csr_pem=csr_pem, proof=proof)

    def store_renewed(self, new_key_pem: bytes, renewed: gp.CertRenewed) -> None:
        """Check the renewed certificate against ``new_key_pem`` and the CA, then swap the
        stored state to it (atomically) and move this object along."""
        key = _load_key(new_key_pem, "the renewal key")
        cert = _load_cert(renewed.cert_pem, "the renewed certificate", "bad_answer")
        ca = _load_cert(self.ca_pem, "the stored CA", "state")
        _check_worker_cert(cert, key, ca, self.worker_id, "the renewed certificate", "bad_answer")
        not_before, not_after = _validity(cert)
        state = _StateFile(
            gateway_id=self.gateway_id,
            ws_url=self.ws_url,
            not_after=not_after,
            enrolled_at=self.enrolled_at,
        )
        try:
            _replace_state(self.state_dir, _state_files(new_key_pem, cert, self.ca_pem, state))
        except OSError as exc:
            raise GatewayEnrollError(
                f"cannot store the renewed certificate in {self.directory}: {exc.strerror or exc}",
                code="state",
            ) from None
        self.not_before, self.not_after = not_before, not_after


# --------------------------------------------------------------------------------------------
# Enrolling


GrantSource = Callable[[], Awaitable[wire.GatewayEnrollGrant]]


async def enroll(
    state_dir: Path,
    worker_key: WorkerKey,
    request_grant: GrantSource,
    *,
    timeout_s: float = ENROLL_TIMEOUT_S,
    clock: Callable[[], float] = time.time,
) -> GatewayEnrollment:
    """Enroll with the gateway the miner's validators use; replaces any stored state.

    ``request_grant`` asks the miner (:meth:`.link.WorkerLink.request_gateway_grant`); its
    :class:`~.link.MinerRequestError` becomes a :class:`GatewayEnrollError` with code
    ``no_grant``. Call this when :meth:`GatewayEnrollment.load` finds nothing usable, the
    certificate expired, or the gateway refused it.
    """
    try:
        grant = await request_grant()
    except MinerRequestError as exc:
        where = "the miner refused" if exc.code is not None else "no answer from the miner"
        raise GatewayEnrollError(
            f"no gateway enrollment token ({where}): {exc}", code="no_grant", wire_code=exc.code
        ) from None
    return await enroll_with_grant(state_dir, worker_key, grant, timeout_s=timeout_s, clock=clock)


async def enroll_with_grant(
    state_dir: Path,
    worker_key: WorkerKey,
    grant: wire.GatewayEnrollGrant,
    *,
    timeout_s: float = ENROLL_TIMEOUT_S,
    clock: Callable[[], float] = time.time,
) -> GatewayEnrollment:
    """Steps 2-4 of the module docstring with a grant already in hand."""
    worker_id = worker_key.worker_id
    if grant.worker_id != worker_id:
        raise GatewayEnrollError(
            f"the grant is for worker {grant.worker_id}, not this one ({worker_id})",
            code="bad_answer",
        )
    token = grant.grant
    ca = _load_cert(token.ca_pem, "the grant's CA", "bad_answer")
    tls_key = _new_tls_key()
    csr = _csr(tls_key, worker_id)
    csr_der = csr.public_bytes(serialization.Encoding.DER)
    body = gp.EnrollRequest(
        worker_id=worker_id,
        worker_public_key=worker_key.public_key,
        csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        proof=worker_key.sign(gp.enroll_proof_message(token.token, csr_der)),
    )
    answer = await _post_enroll(token, body, _pinned_context(token.ca_pem), timeout_s)
    # create() checks the certificate (this key, this worker, the grant's CA, not expired) and
    # writes and fsyncs the state: off the event loop.
    return await asyncio.to_thread(
        GatewayEnrollment.create,
        Path(state_dir),
        worker_id=worker_id,
        key_pem=_key_pem(tls_key),
        cert_pem=answer.cert_pem,
        ca_pem=_pem(ca),
        gateway_id=token.gateway_id,
        ws_url=answer.ws_url,
        enrolled_at=clock(),
    )


def _pinned_context(ca_pem: str) -> ssl.SSLContext:
    # PROTOCOL_TLS_CLIENT loads no system CA: the grant's CA is the only root.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cadata=ca_pem)
    except ssl.SSLError as exc:
        raise GatewayEnrollError(
            f"the grant's CA is unusable: {_shown(str(exc))}", code="bad_answer"
        ) from None
    return context


async def _post_enroll(
    grant: wire.GatewayGrant,
    body: gp.EnrollRequest,
    context: ssl.SSLContext,
    timeout_s: float,
) -> gp.EnrollResponse:
    url = grant.enroll_url
    headers = {
        "Authorization": f"Bearer {grant.token}",
        "Content-Type": "application/json",
        "Accept": "application/json",
    }
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with (
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context, limit=1), timeout=timeout
            ) as http,
            http.post(
                url, data=msgspec.json.encode(body), headers=headers, allow_redirects=False
            ) as response,
        ):
            raw = await _read_bounded(response)
            status = response.status
    except aiohttp.ClientConnectorCertificateError as exc:
        raise GatewayEnrollError(
            f"the server at {_shown(url)} is not the gateway of the grant: its certificate does "
            f"not chain to the grant's CA ({_shown(str(exc.certificate_error))})",
            code="tls",
        ) from None
    except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
        raise GatewayEnrollError(
            f"TLS with {_shown(url)} failed: {_shown(str(exc))}", code="tls"
        ) from None
    except TimeoutError:
        raise GatewayEnrollError(
            f"the gateway at {_shown(url)} did not answer within {timeout_s:g} s",
            code="unreachable",
        ) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise GatewayEnrollError(
            f"cannot reach the gateway at {_shown(url)}: {_shown(str(exc))}", code="unreachable"
        ) from None
    if len(raw) > _MAX_ANSWER_BYTES:
        raise GatewayEnrollError(
            f"the gateway's answer is larger than {_MAX_ANSWER_BYTES} bytes", code="bad_answer"
        )
    if status != 200:
        raise _refusal(status, raw)
    try:
        return msgspec.json.decode(raw, type=gp.EnrollResponse)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise GatewayEnrollError(
            f"the gateway's answer is malformed: {_shown(str(exc))}", code="bad_answer"
        ) from None


async def _read_bounded(response: aiohttp.ClientResponse) -> bytes:
    """The body, or a little more than the bound when it is too large (then refused)."""
    body = bytearray()
    async for chunk in response.content.iter_chunked(16 * 1024):
        body += chunk
        if len(body) > _MAX_ANSWER_BYTES:
            break
    return bytes(body)


def _refusal(status: int, raw: bytes) -> GatewayEnrollError:
    try:
        error = msgspec.json.decode(raw, type=gp.ApiError)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return GatewayEnrollError(
            f"the gateway refused the enrollment with HTTP {status}", code=f"http_{status}"
        )
    code = error.error if _ERROR_CODE.match(error.error) else f"http_{status}"
    return GatewayEnrollError(
        f"the gateway refused the enrollment (HTTP {status} {_shown(error.error)}: "
        f"{_shown(error.message)})",
        code=code,
    )
