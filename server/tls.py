"""TLS for the gRPC port: certificate files, their validation and reload.

``longbatch serve --tls-cert PEM --tls-key PEM [--tls-client-ca PEM]`` reads
the files here. gRPC takes the certificate as bytes and, handed a bad pair,
fails every handshake with a C-core log line instead of refusing to start, so
every set of bytes is checked with the ``ssl`` module first: a key that does
not match its certificate, a file that is not PEM or a CA file without a
certificate is one ``TlsError`` line at start, and at reload the old
certificate stays.

Reload: the server's credentials are ``grpc.dynamic_ssl_server_credentials``,
whose fetcher gRPC calls before every TLS handshake. The fetcher compares the
files' stat signatures (inode, size, mtime, ctime) with those of the
certificate being served and reads them again when one changed, so a rotated
certificate (written in place, renamed over, or a Kubernetes secret's
symlink swap) is served to the next new connection without a restart;
connections already open keep the certificate they were made with. SIGHUP
(``reload_now``) reads them at once and logs the outcome. A new set that does
not validate (the certificate written, its key not yet) is logged once and
the current one kept; it is tried again when the files change again.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc

log = logging.getLogger("longbatch.tls")


class TlsError(Exception):
    """A certificate, key or CA file is unreadable or invalid; the message is one line."""


@dataclass(frozen=True)
class TlsFiles:
    """Where the server's TLS material lives."""

    cert: Path
    """PEM certificate chain, the server's certificate first."""
    key: Path
    """PEM private key of that certificate, unencrypted."""
    client_ca: Path | None = None
    """PEM CA certificate(s) that sign client certificates; set, every client
    must present one (mTLS)."""


@dataclass(frozen=True)
class TlsMaterial:
    """The bytes of one validated set of TLS files."""

    cert: bytes
    key: bytes
    client_ca: bytes | None


_Stamp = tuple[tuple[int, int, int, int], ...]


def _stamp(files: TlsFiles) -> _Stamp:
    """What changes when any of the files is rewritten or replaced."""
    paths = [files.cert, files.key] + ([files.client_ca] if files.client_ca is not None else [])
    stamps = []
    for path in paths:
        st = os.stat(path)
        stamps.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(stamps)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TlsError(f"cannot read the {what} {path}: {e.strerror or e}") from e


def _encrypted_key() -> str:
    # Called by OpenSSL only for an encrypted key; without this it would
    # prompt on the terminal. gRPC cannot use an encrypted key anyway.
    raise TlsError("is encrypted; gRPC needs an unencrypted PEM key")


def load_material(files: TlsFiles) -> TlsMaterial:
    """Read and validate the files.

    The pair is checked by loading it into an ``ssl`` context from the same
    paths, then the bytes are read again: if they differ, the files changed
    while being checked (a rotation under way) and the set is refused, so the
    bytes handed to gRPC are always the ones that were checked.

    Raises:
        TlsError: a file is unreadable, not PEM, the key does not match the
            certificate, the key is encrypted, or the CA file holds no
            certificate.
    """
    cert = _read(files.cert, "TLS certificate")
    key = _read(files.key, "TLS key")
    client_ca = _read(files.client_ca, "TLS client CA") if files.client_ca is not None else None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(files.cert, files.key, password=_encrypted_key)
    except TlsError as e:
        raise TlsError(f"the TLS key {files.key} {e}") from e
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e) or "key values mismatch" in str(e):
            raise TlsError(f"the TLS key {files.key} does not match the certificate {files.cert}") from e
        raise TlsError(f"the TLS certificate {files.cert} or key {files.key} is not valid PEM ({e.reason or e})") from e
    except OSError as e:
        raise TlsError(f"cannot read the TLS certificate {files.cert} or key {files.key}: {e.strerror or e}") from e
    if client_ca is not None:
        assert files.client_ca is not None
        try:
            context.load_verify_locations(cadata=client_ca.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError, ValueError) as e:
            raise TlsError(f"the TLS client CA {files.client_ca} holds no valid PEM certificate") from e
    if _read(files.cert, "TLS certificate") != cert or _read(files.key, "TLS key") != key:
        raise TlsError(f"the TLS certificate {files.cert} or key {files.key} changed while it was read")
    return TlsMaterial(cert, key, client_ca)


def _configuration(material: TlsMaterial) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(material.key, material.cert)], material.client_ca)


class CertificateReloader:
    """The server's TLS credentials, reloaded when their files change.

    Build it before the server starts (it reads and validates the files, so
    a bad file stops the start); ``credentials()`` goes to ``add_secure_port``.
    """

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        """The files being served."""
        # Stamped before reading: a change made meanwhile is seen at the first handshake.
        try:
            stamp: _Stamp | None = _stamp(files)
        except OSError:
            stamp = None  # load_material says which file, in its words
        self._material = load_material(files)
        if stamp is None:
            try:
                stamp = _stamp(files)
            except OSError as e:
                raise TlsError(f"cannot read TLS file {e.filename}: {e.strerror or e}") from e
        # gRPC calls the fetcher from its own threads, one per handshake.
        self._lock = threading.Lock()
        self._served: _Stamp = stamp
        self._refused: _Stamp | None = None
        self._unreadable = False
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.reloads = 0
        """How many times a changed set of files was taken up."""

    @property
    def mtls(self) -> bool:
        """True when clients must present a certificate signed by the client CA."""
        return self.files.client_ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials for ``add_secure_port`` that pick up changed files."""
        # grpc-stubs type the fetcher without its documented None ("no change").
        fetch = cast(Callable[[], grpc.ServerCertificateConfiguration], self._fetch)
        return grpc.dynamic_ssl_server_credentials(
            _configuration(self._material), fetch, require_client_authentication=self.mtls
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher: a new configuration once after the files changed, else None."""
        try:
            with self._lock:
                self._check(reason="the TLS files changed")
                pending, self._pending = self._pending, None
                return pending
        except Exception:  # an exception here would go into gRPC's C core
            log.exception("TLS certificate check failed; serving the current certificate")
            return None

    def _check(self, *, reason: str, force: bool = False) -> bool:
        """Read the files again if they changed (or ``force``); True if a new
        set was taken up. Called with the lock held."""
        try:
            stamp = _stamp(self.files)
        except OSError as e:
            # A file gone for a moment (renamed over) is normal mid-rotation:
            # said once, not on every handshake until it is back.
            if force or not self._unreadable:
                log.warning("%s but %s cannot be read (%s); still serving the current certificate",
                            reason, e.filename, e.strerror or e)
            self._unreadable = True
            return False
        self._unreadable = False
        if not force and (stamp == self._served or stamp == self._refused):
            return False
        try:
            material = load_material(self.files)
        except TlsError as e:
            log.warning("%s but the new set is not usable: %s; still serving the current certificate", reason, e)
            self._refused = stamp
            return False
        self._material, self._served, self._refused = material, stamp, None
        self._pending = _configuration(material)
        self.reloads += 1
        log.info("%s: new connections get the certificate from %s", reason, self.files.cert)
        return True

    def ssl_context(self) -> ssl.SSLContext:
        """An ``ssl`` context for the HTTP port with the same certificate (and
        client CA under mTLS), taking up changed files as gRPC does: checked
        at every handshake, swapped in for new connections."""
        current = [self._served, self._context()]

        def on_hello(connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
            try:
                with self._lock:
                    self._check(reason="the TLS files changed")
                    if current[0] != self._served:
                        current[:] = [self._served, self._context()]
                connection.context = current[1]  # type: ignore[assignment]
            except Exception:  # raised here, it would fail the handshake
                log.exception("TLS certificate check failed; serving the current certificate")

        listener = self._context()
        listener.sni_callback = on_hello
        return listener

    def _context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.files.cert, self.files.key, password=_encrypted_key)
        if self.files.client_ca is not None:
            context.load_verify_locations(cadata=(self._material.client_ca or b"").decode("ascii"))
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def reload_now(self) -> bool:
        """Read the files now (SIGHUP), whether or not they look changed; True
        if the new set validated and new connections will get it."""
        with self._lock:
            return self._check(reason="SIGHUP", force=True)
