"""``lpcvlab runs prune``: close the runs whose process died without a word.

A run killed with SIGKILL, by the out-of-memory killer or a power cut cannot mark itself; it would
stay RUNNING in MLflow forever. Every run records its host and process ID as tags; this verb marks
the store's RUNNING runs whose process is gone from this host as FAILED
(``failure=process-vanished``). ``python run.py`` does the same for its own store when it starts.
"""

from __future__ import annotations

import argparse

from lpcvlab.cli.common import add_store_argument, store_uri


def add_runs_commands(subparsers: argparse._SubParsersAction) -> None:
    runs = subparsers.add_parser("runs", help="maintenance of the MLflow store's runs")
    verbs = runs.add_subparsers(dest="runs_command", metavar="VERB", required=True)
    prune = verbs.add_parser(
        "prune",
        help="mark RUNNING runs whose process is gone from this host as FAILED",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_store_argument(prune)
    prune.set_defaults(func=prune_command)


def prune_command(args: argparse.Namespace) -> int:
    from lpcvlab.tracking.runstore import open_store
    from lpcvlab.tracking.store import check_store, prune_vanished

    uri = store_uri(args)
    client = open_store(uri)
    check_store(uri)
    gone = prune_vanished(client)
    for run in gone:
        print(
            f"{run.run_id}  {run.name or '(no name)'}  experiment {run.experiment_id}: process "
            f"{run.pid} is gone -> FAILED (failure=process-vanished)"
        )
    print(f"{len(gone)} run(s) marked FAILED in {uri}" if gone else f"nothing to prune in {uri}")
    return 0
