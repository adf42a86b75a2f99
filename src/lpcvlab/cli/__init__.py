"""The ``lpcvlab`` console script: verbs that are not one Hydra job (data tools, hub, reproduce,
register, submit)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lpcvlab.errors import LpcvlabError

# Each module exposes add_<name>_commands(subparsers) and sets `func` on its parsers.
_COMMAND_MODULES: list[tuple[str, str]] = [
    ("lpcvlab.cli.qevd", "add_qevd_commands"),
    ("lpcvlab.cli.hub", "add_hub_commands"),
    ("lpcvlab.cli.compare", "add_compare_commands"),
    ("lpcvlab.cli.reproduce", "add_reproduce_commands"),
    ("lpcvlab.cli.runs", "add_runs_commands"),
    ("lpcvlab.cli.register", "add_register_commands"),
    ("lpcvlab.cli.submit", "add_submit_commands"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lpcvlab", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for module, func in _COMMAND_MODULES:
        getattr(importlib.import_module(module), func)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from lpcvlab.app import install_signal_handlers
    from lpcvlab.errors import Interrupted

    install_signal_handlers()
    try:
        return int(args.func(args) or 0)
    except LpcvlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        stop = exc if isinstance(exc, Interrupted) else Interrupted("SIGINT")
        print(f"\n{stop.paragraph()}", file=sys.stderr)
        return stop.exit_code


if __name__ == "__main__":
    sys.exit(main())
