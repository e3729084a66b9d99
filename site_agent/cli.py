"""The ``flare-agent`` command: run a site's agent from its startup kit.

    flare-agent start --kit DIR [--host H] [--port N] [--root-fingerprint SHA256]
                      [--max-weights-bytes N] [--max-bundle-bytes N] [--log-level LEVEL]

The kit's signed ``startup/`` is verified before anything else; a changed, missing or
added file stops the agent with the file named. SIGTERM, SIGINT and an admin's
Shutdown call stop it cleanly (running tasks are recorded as stopped).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from flare_provider.provisioning.signature import KitVerificationError

from .errors import AgentError
from .kit_config import DEFAULT_MAX_BUNDLE_BYTES, DEFAULT_MAX_WEIGHTS_BYTES

# LogRecord's own attributes; everything else on a record was passed as ``extra``.
_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class KeyValueFormatter(logging.Formatter):
    """``time level logger: message key=value ...``: readable, and parseable by field."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = {k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS and not k.startswith("_")}
        if extras:
            text += " " + " ".join(f"{k}={v}" for k, v in sorted(extras.items()))
        return text


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def _size(text: str) -> int:
    """A byte count: a plain integer or one with a K/M/G/T suffix (powers of 1024)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        value = int(text[:-1]) * units[text[-1]] if text and text[-1] in units else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 8G, 256M or a number of bytes)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("a size must be positive")
    return value


def cmd_start(args: argparse.Namespace) -> int:
    from .service.server import (  # the runtime's imports are heavy; keep --help fast
        Limits,
        SiteAgent,
    )

    limits = Limits(max_weights_bytes=args.max_weights_bytes, max_bundle_bytes=args.max_bundle_bytes)
    agent = SiteAgent(args.kit, host=args.host, port=args.port, root_fingerprint=args.root_fingerprint, limits=limits)
    agent.start()

    def on_signal(signum, frame):
        agent.request_stop(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    reason = agent.wait()
    logging.getLogger("site_agent.cli").info("stopping: %s", reason)
    agent.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flare-agent", description="The site agent of a federation")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="verify the kit and serve the agent (mutual TLS)")
    start.add_argument("--kit", required=True, type=Path, help="the site's kit folder (holding startup/ and local/)")
    start.add_argument("--host", help="address to listen on (default: agent.json's listen_host)")
    start.add_argument("--port", type=int, help="port to listen on (default: agent.json's port; 0 picks a free one)")
    start.add_argument("--root-fingerprint", help="refuse a kit whose root CA has another SHA-256 fingerprint")
    start.add_argument(
        "--max-weights-bytes", type=_size, default=DEFAULT_MAX_WEIGHTS_BYTES, metavar="SIZE",
        help="largest global weights a task may bring (default 8G)",
    )
    start.add_argument(
        "--max-bundle-bytes", type=_size, default=DEFAULT_MAX_BUNDLE_BYTES, metavar="SIZE",
        help="largest app bundle (default 256M)",
    )
    start.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    start.set_defaults(func=cmd_start)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        return args.func(args)
    except KitVerificationError as exc:
        print(f"error: refusing to start: {exc}", file=sys.stderr)
        return 2
    except (AgentError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
