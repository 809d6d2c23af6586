"""``longbatch serve``: flags with LONGBATCH_* fallbacks, signals, shutdown."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import sys
from pathlib import Path

from .app import start_server
from .config import ConfigError, load_config

log = logging.getLogger("longbatch")


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="longbatch serve", description="Run the longbatch server.")
    p.add_argument("--host", default=env("LONGBATCH_HOST", "127.0.0.1"),
                   help="address to listen on (LONGBATCH_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(env("LONGBATCH_PORT", "50051")),
                   help="port; 0 picks a free one (LONGBATCH_PORT, default 50051)")
    p.add_argument("--data-dir", type=Path, default=Path(env("LONGBATCH_DATA_DIR", "./longbatch-data")),
                   help="SQLite database and files (LONGBATCH_DATA_DIR, default ./longbatch-data)")
    p.add_argument("--config", type=Path, default=Path(c) if (c := env("LONGBATCH_CONFIG")) else None,
                   help="TOML config: models, API keys, limits (LONGBATCH_CONFIG)")
    p.add_argument("--allow-open", action="store_true", default=env("LONGBATCH_ALLOW_OPEN", "") in ("1", "true"),
                   help="serve without API keys on a non-loopback address (LONGBATCH_ALLOW_OPEN=1)")
    p.add_argument("--log-level", default=env("LONGBATCH_LOG_LEVEL", "INFO"),
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="(LONGBATCH_LOG_LEVEL, default INFO)")
    return p


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def serve(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT, then shut down in order."""
    config = load_config(args.config)
    if not config.api_keys and not is_loopback(args.host) and not args.allow_open:
        print(f"error: no API keys are configured, so longbatch runs open and will only listen on loopback; "
              f"configure [[api_keys]] or pass --allow-open to serve {args.host} anyway", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await start_server(config, args.data_dir, args.host, args.port)
    # Printed only once signals are handled: a supervisor may stop us as soon
    # as it reads this line.
    print(f"longbatch listening on {args.host}:{running.port}", flush=True)
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
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
