"""The `magpie` command line: Magpie's composition root.

It is the one place that reads settings, configures logging, and wires storage, engine, service, retrainer and
adapters together; everything below it receives what it needs as arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from core.db import upgrade
from core.errors import MagpieError
from core.settings import Settings, load_settings

log = logging.getLogger("magpie")


def configure_logging(settings: Settings) -> None:
    """Logging is configured here only; noisy libraries are turned down so tokens in URLs never reach logs."""
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("httpx", "httpcore", "telegram.ext.Updater", "discord.gateway", "discord.http", "aiosqlite"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


async def _db_upgrade(settings: Settings, quiet: bool) -> None:
    await upgrade(settings.database_url)
    if not quiet:
        print("Database is up to date.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="magpie", description="A self-hosted GPT-2 chatbot that learns.")
    commands = parser.add_subparsers(dest="command", required=True)
    db = commands.add_parser("db", help="database maintenance").add_subparsers(dest="db_command", required=True)
    up = db.add_parser("upgrade", help="apply the schema migrations")
    up.add_argument("--quiet", action="store_true", help="print nothing on success")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        configure_logging(settings)
        if args.command == "db" and args.db_command == "upgrade":
            asyncio.run(_db_upgrade(settings, args.quiet))
        return 0
    except MagpieError as exc:
        print(f"magpie: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
