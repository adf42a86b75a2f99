"""What the verbs that read the MLflow store share: the ``--tracking-uri`` option and the client."""

from __future__ import annotations

import argparse
from typing import Any

STORE_HELP = "MLflow store (default: MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)"


def add_store_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", help=STORE_HELP)


def store_uri(args: argparse.Namespace) -> str:
    from lpcvlab.tracking.runstore import tracking_uri

    return tracking_uri(args.tracking_uri)


def store_client(args: argparse.Namespace) -> Any:
    """A client of the store that retries SQLite's "database is locked" (a sweep may be writing)."""
    from lpcvlab.tracking.recorder import RetryingClient
    from lpcvlab.tracking.runstore import open_store

    return RetryingClient(open_store(store_uri(args)))
