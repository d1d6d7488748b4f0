"""`kernel-driver ui`: serve the web console (waitress, a production WSGI server) until stopped."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import click
import waitress
from psycopg_pool import ConnectionPool

from kernel_driver.compatibility import require_kernel
from kernel_driver.config import Settings
from kernel_driver.console.app import Console, create_app
from kernel_driver.console.auth import Access, Tokens, generated_admin_token, parse_tokens
from kernel_driver.db import database, require_dsn
from kernel_driver.errors import BadUsage

DEFAULT_BIND = "127.0.0.1:8700"


def parse_bind(bind: str) -> tuple[str, int]:
    host, _, port = bind.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise BadUsage(f"--bind {bind!r} is not HOST:PORT (e.g. {DEFAULT_BIND}; port 0: any free one)")
    return host.strip("[]"), int(port)


@click.command()
@click.option("--bind", default=DEFAULT_BIND, show_default=True, metavar="HOST:PORT",
              help="Where to listen. Anything but a loopback address exposes the console to the network.")
@click.option("--tokens", "tokens_file", type=click.Path(dir_okay=False, path_type=Path), envvar="KERNEL_UI_TOKENS",
              help="File of access tokens: `admin TOKEN` or `tenant TENANT_UUID TOKEN` per line"
                   " [env: KERNEL_UI_TOKENS; default: one admin token, made up and printed now].")
@click.option("--threads", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Requests served at once (and the most database connections).")
@click.pass_obj
def ui(settings: Settings, bind: str, tokens_file: Path | None, threads: int) -> None:
    """Serve the web console: runs, run details, retry and cancel, launch checklist and deploy,
    certification. Every page needs a token; a tenant's token sees only its tenant."""
    host, port = parse_bind(bind)
    try:
        grants = parse_tokens(tokens_file) if tokens_file else [(generated_admin_token(), Access(None))]
    except ValueError as exc:
        raise BadUsage(str(exc)) from None
    with database(settings) as conn:
        version = require_kernel(conn, settings.schema)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pool = ConnectionPool(require_dsn(settings), min_size=1, max_size=threads, open=True,
                          kwargs={"autocommit": True, "prepare_threshold": None})
    console = Console(settings, Tokens(grants), pool)
    # SIGTERM ends the server like Ctrl-C does, through the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        try:
            server = waitress.create_server(create_app(console), host=host, port=port, threads=threads,
                                            ident="kernel-console")
        except OSError as exc:
            raise BadUsage(f"cannot listen on {bind}: {exc.strerror}") from None
        address = f"http://{host if ':' not in host else f'[{host}]'}:{server.effective_port}/"
        click.echo(f"console: {address} (kernel {version}, schema {settings.schema})")
        if tokens_file is None:
            click.echo(f"sign in with: {address}login?token={grants[0][0]}")
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        console.certifier.close()
        pool.close()
