"""``lpcvlab reproduce``: the verb over :mod:`lpcvlab.tracking.reproduce`, running the pipeline
through the entry point's :func:`lpcvlab.app.run_config`."""

from __future__ import annotations

import argparse

from lpcvlab.cli.common import add_store_argument, module_doc, run_id, store_uri


def add_reproduce_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "reproduce",
        help="re-run a logged run from its config and compare metrics",
        description=module_doc("lpcvlab.tracking.reproduce"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_id", type=run_id, metavar="RUN_ID")
    p.add_argument(
        "--force",
        action="store_true",
        help="run even if the code version differs or is dirty, or the run did not finish",
    )
    p.add_argument(
        "--use-cache", action="store_true", help="let the re-run reuse cached stages (faster)"
    )
    add_store_argument(p)
    p.set_defaults(func=reproduce_command)


def reproduce_command(args: argparse.Namespace) -> int:
    from lpcvlab.app import run_config
    from lpcvlab.tracking import reproduce

    rep = reproduce.reproduce(
        args.run_id, store_uri(args), run_config, force=args.force, use_cache=args.use_cache
    )
    print(reproduce.report(rep))
    return 0 if rep.reproduced else 1
