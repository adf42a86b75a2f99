"""``lpcvlab register``: the verb over :mod:`lpcvlab.tracking.registry`."""

from __future__ import annotations

import argparse

from lpcvlab.cli.common import add_store_argument, module_doc, registry_name, run_id, store_client


def add_register_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "register",
        help="register a finished run's components as submission candidates",
        description=module_doc("lpcvlab.tracking.registry"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_id", type=run_id, metavar="RUN_ID")
    p.add_argument(
        "--name",
        type=registry_name,
        help="registered model prefix (default: the run's tracking.registry_name, else "
        "lpcvc-track1 / lpcvc-track2); each component is <name>-<component>",
    )
    add_store_argument(p)
    p.set_defaults(func=register_command)


def register_command(args: argparse.Namespace) -> int:
    from lpcvlab.tracking import registry

    versions = registry.register_run(store_client(args), args.run_id, args.name)
    print(f"run {args.run_id}:")
    for v in versions:
        print(f"  {v.line()}")
    return 0
