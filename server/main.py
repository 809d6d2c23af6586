"""``longbatch serve``: flags with LONGBATCH_* fallbacks, signals, shutdown.

Exit codes: 0 after a clean shutdown, 1 when the server could not start
(port, data dir, database unreachable or in use by another server), 2 for bad flags, a bad config or bad TLS files.
Every start-up failure is one ``error: …`` line on stderr, never a traceback
(``--log-level DEBUG`` logs it).

Listening anywhere but loopback needs TLS (``--tls-cert``/``--tls-key``) or
``--allow-insecure``, and, with no credentials configured, ``--allow-open``:
both are checked before any socket is made (``listen_refusal``).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from .app import start_server
from .config import ConfigError, ServerConfig, load_config
from .datadir import DataDirInUse, lock_data_dir
from .pg_server_lock import DatabaseInUse
from .pg_store import DatabaseUnavailable
from .tls import CertificateReloader, TlsError, TlsFiles

log = logging.getLogger("longbatch")


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="longbatch serve", description="Run the longbatch server.",
        epilog="exit status: 0 after a clean shutdown (SIGTERM, Ctrl-C), 1 when it could not start (port or data "
               "dir in use, damaged or unreachable database, a database another server uses), 2 for bad flags "
               "(a --database-url that is not postgresql://), a bad config or unusable TLS files",
    )
    p.add_argument("--host", default=env("LONGBATCH_HOST", "127.0.0.1"),
                   help="address to listen on (LONGBATCH_HOST, default 127.0.0.1)")
    # A string default goes through type=int too: a bad LONGBATCH_PORT is a usage error, not a traceback.
    p.add_argument("--port", type=int, default=env("LONGBATCH_PORT", "50051"),
                   help="port; 0 picks a free one (LONGBATCH_PORT, default 50051)")
    p.add_argument("--http-port", type=_http_port, default=env("LONGBATCH_HTTP_PORT", "8080"), metavar="PORT|off",
                   help="port of the HTTP API (Gemini REST, /metrics, /healthz) on the same host; 0 picks a free "
                        "one, 'off' disables it (LONGBATCH_HTTP_PORT, default 8080)")
    p.add_argument("--data-dir", type=Path, default=Path(env("LONGBATCH_DATA_DIR", "./longbatch-data")),
                   help="SQLite database and files, or only scratch space with --database-url; one server per "
                        "data dir, locked (LONGBATCH_DATA_DIR, default ./longbatch-data)")
    p.add_argument("--database-url", default=env("LONGBATCH_DATABASE_URL") or None, metavar="URL",
                   help="keep batches, files and events in this PostgreSQL database (postgresql://user:password@"
                        "host:port/db) instead of SQLite; --data-dir is then scratch space, still locked, so two "
                        "servers on one machine need different --data-dir. One server per database for now: a "
                        "second is refused (LONGBATCH_DATABASE_URL)")
    p.add_argument("--config", type=Path, default=Path(c) if (c := env("LONGBATCH_CONFIG")) else None,
                   help="TOML config: models, API keys, limits (LONGBATCH_CONFIG)")
    p.add_argument("--allow-open", action="store_true", default=env("LONGBATCH_ALLOW_OPEN", "") in ("1", "true"),
                   help="serve without API keys on a non-loopback address (LONGBATCH_ALLOW_OPEN=1)")
    p.add_argument("--tls-cert", type=Path, default=_path(env("LONGBATCH_TLS_CERT")), metavar="PEM",
                   help="serve TLS with this PEM certificate chain (LONGBATCH_TLS_CERT); reloaded when the file "
                        "changes or on SIGHUP")
    p.add_argument("--tls-key", type=Path, default=_path(env("LONGBATCH_TLS_KEY")), metavar="PEM",
                   help="the certificate's unencrypted PEM private key (LONGBATCH_TLS_KEY)")
    p.add_argument("--tls-client-ca", type=Path, default=_path(env("LONGBATCH_TLS_CLIENT_CA")), metavar="PEM",
                   help="require client certificates signed by this CA: mTLS (LONGBATCH_TLS_CLIENT_CA)")
    p.add_argument("--allow-insecure", action="store_true",
                   default=env("LONGBATCH_ALLOW_INSECURE", "") in ("1", "true"),
                   help="serve plaintext on a non-loopback address, e.g. behind a TLS proxy "
                        "(LONGBATCH_ALLOW_INSECURE=1)")
    p.add_argument("--log-level", default=env("LONGBATCH_LOG_LEVEL", "INFO"),
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="(LONGBATCH_LOG_LEVEL, default INFO)")
    return p


def _http_port(value: str) -> int | None:
    """``--http-port``: a port number, or None for ``off``."""
    if value.strip().lower() == "off":
        return None
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port (0-65535; 0 picks a free one) or 'off', got {value!r}")
    return port


def database_url_refusal(url: str | None) -> str | None:
    """Why ``--database-url`` is unusable, in one line (never its password), or None."""
    if url is None:
        return None
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in ("postgresql", "postgres"):
        shown = f"scheme {scheme!r}" if scheme else "no scheme"
        return f"--database-url must be a postgresql:// or postgres:// URL, got {shown}"
    return None


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class StartupError(Exception):
    """The server could not start; the message is the one line to print."""


def listen_refusal(args: argparse.Namespace, config: ServerConfig) -> str | None:
    """Why these flags and this config must not serve, in one line, or None.

    Pure: it runs before any TLS file is read or socket made, so a refused
    ``--host`` never binds.
    """
    if (args.tls_cert is None) != (args.tls_key is None):
        return "--tls-cert and --tls-key go together: give both, or neither for plaintext"
    if args.tls_client_ca is not None and args.tls_cert is None:
        return "--tls-client-ca (mTLS) needs TLS: give --tls-cert and --tls-key too"
    if config.tls_clients and args.tls_client_ca is None:
        return ("the config's [[tls_clients]] map client certificates to tenants, which needs mTLS: "
                "give --tls-client-ca")
    if is_loopback(args.host):
        return None
    # With a client CA every caller holds a certificate it signed: not open.
    if not config.api_keys and not config.tls_clients and args.tls_client_ca is None and not args.allow_open:
        return (f"no API keys are configured, so longbatch runs open and will only listen on loopback; "
                f"configure [[api_keys]] or pass --allow-open to serve {args.host} anyway")
    if args.tls_cert is None and not args.allow_insecure:
        return (f"refusing to serve {args.host} in plaintext: API keys, prompts and outputs would cross the network "
                f"in clear; give --tls-cert and --tls-key, or pass --allow-insecure (LONGBATCH_ALLOW_INSECURE=1) "
                f"when something else encrypts the traffic")
    return None


def _bind_failure(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on, in words, or None if it can.

    Probed before grpc binds, as grpc does (SO_REUSEADDR, every address the
    host resolves to, failing only if none binds): grpc would print its own
    multi-line C-core log and raise a bare RuntimeError.
    """
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"cannot resolve {host}: {e.strerror}"
    failure: OSError | None = None
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
            return None
        except OSError as e:
            failure = failure if failure is not None and failure.errno == errno.EADDRINUSE else e
    if failure is None:
        return None
    if failure.errno == errno.EADDRINUSE:
        return f"port {port} is in use (another server?); pass another --port, or --port 0 for a free one"
    return failure.strerror or str(failure)


def config_file_note(path: Path, config: ServerConfig) -> str | None:
    """A warning when a config that holds secrets is readable by other users."""
    secret = bool(config.api_keys or config.webhook_secret
                  or any("api_key" in m.options or m.options.get("headers") for m in config.models))
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return None
    if not secret or not mode & 0o077:
        return None
    return (f"config {path} holds secrets (API keys, a webhook secret or a model's api_key/headers) and is "
            f"readable by other users (mode {mode:04o}); chmod 600 it")


def _models_note(config: ServerConfig) -> str | None:
    """A note when a config's ``[[models]]`` replaced the built-in echo models."""
    if any(m.name == "models/echo" for m in config.models):
        return None
    names = ", ".join(m.name for m in config.models)
    return (f"serving {names}: a config's [[models]] replaces the built-in models/echo and models/echo-slow "
            f"(list them in the config to keep them)")


async def serve(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT, then shut down in order.

    Raises:
        ConfigError: the config file is unreadable or invalid.
        StartupError: anything else kept the server from starting.
    """
    config = load_config(args.config)
    if (refusal := listen_refusal(args, config) or database_url_refusal(args.database_url)) is not None:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    tls = None
    if args.tls_cert is not None:
        # Read and checked before the port and the data dir are touched.
        tls = CertificateReloader(TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca))
    if args.port and (why := _bind_failure(args.host, args.port)) is not None:
        raise StartupError(f"cannot listen on {args.host}:{args.port}: {why}")
    if args.http_port and (why := _bind_failure(args.host, args.http_port)) is not None:
        raise StartupError(f"cannot listen for HTTP on {args.host}:{args.http_port}: "
                           f"{why.replace('--port', '--http-port')}")
    # Everything the server creates from here on (database, -wal, -shm, files,
    # results written by worker processes, which inherit it) is private to
    # this user; datadir and files also set 0600 explicitly, for servers
    # started in a process of someone else's (tests, embedding).
    os.umask(0o077)
    try:
        # Before the store opens: a second server on this dir must not touch it.
        lock = lock_data_dir(args.data_dir)
    except DataDirInUse as e:
        raise StartupError(str(e)) from e
    except OSError as e:
        raise StartupError(f"cannot use data dir {args.data_dir}: {e.strerror or e}") from e
    try:
        return await _run(config, args, tls)
    finally:
        lock.release()


async def _run(config: ServerConfig, args: argparse.Namespace, tls: CertificateReloader | None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if tls is not None:
        # The files are also checked before every handshake; SIGHUP reads
        # them now and logs the outcome, for an operator who wants to know.
        loop.add_signal_handler(signal.SIGHUP, tls.reload_now)
    try:
        running = await start_server(config, args.data_dir, args.host, args.port, tls, args.http_port,
                                     database_url=args.database_url)
    except (DatabaseUnavailable, DatabaseInUse) as e:
        raise StartupError(str(e)) from e  # already one line, without the password
    except RuntimeError as e:
        if "bind" not in str(e):
            raise StartupError(f"cannot start: {e}") from e
        # The port was taken between the probe and the bind.
        why = _bind_failure(args.host, args.port) or "grpc could not bind it"
        raise StartupError(f"cannot listen on {args.host}:{args.port}: {why}") from e
    except ConfigError:
        raise  # a backend's options, checked as it is built: main() prints it
    except OSError as e:
        raise StartupError(f"cannot start: {e}") from e
    except Exception as e:
        # A damaged database, say: one line, and the traceback at DEBUG.
        raise StartupError(f"cannot start: {type(e).__name__}: {e}") from e
    if (note := _models_note(config)) is not None:
        log.info("%s", note)
    if tls is not None:
        log.info("serving %s on %s:%s (certificate %s)", "mTLS" if tls.mtls else "TLS", args.host, running.port,
                 tls.files.cert)
    elif not is_loopback(args.host):
        log.warning("serving plaintext on %s (--allow-insecure): keys and data cross the network unencrypted "
                    "unless something in front encrypts them", args.host)
    if args.config is not None and (note := config_file_note(args.config, config)) is not None:
        log.warning("%s", note)
    # Printed only once signals are handled: a supervisor may stop us as soon
    # as it reads this line.
    print(f"longbatch listening on {args.host}:{running.port}", flush=True)
    if running.http is not None:
        scheme = "https" if tls is not None else "http"
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"longbatch http listening on {scheme}://{host}:{running.http_port}", flush=True)
    if running.workers is not None:
        # A long-running server starts its worker processes now (about a
        # second of their CPU, in the background) rather than making the
        # first file batch wait for them.
        running.workers.warm()
    await stop.wait()
    log.info("shutting down")
    await running.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``longbatch serve``."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        return runner(serve(args))
    except (ConfigError, TlsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (StartupError, OSError) as e:
        log.debug("start-up failed", exc_info=e)
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
