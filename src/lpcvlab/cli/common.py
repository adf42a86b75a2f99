"""What the verbs that read the MLflow store share: the ``--tracking-uri`` option and the client."""

from __future__ import annotations

import argparse
import ast
import importlib.util
from typing import Any

STORE_HELP = "MLflow store (default: MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)"


def module_doc(module: str) -> str | None:
    """A module's docstring, read from its source without importing it: a verb's ``--help``
    shows its library module's docstring, and ``lpcvlab --help`` must not import MLflow or torch
    to build the parsers."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    with open(spec.origin, encoding="utf-8") as f:
        return ast.get_docstring(ast.parse(f.read()), clean=False)


def run_id(text: str) -> str:
    """argparse ``type`` of a RUN_ID argument: refused, saying what a run ID looks like, before
    any store is opened."""
    from lpcvlab.tracking.runstore import RunLookupError, check_run_id

    try:
        return check_run_id(text)
    except RunLookupError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def registry_name(text: str) -> str:
    """argparse ``type`` of ``--name`` (a registered model prefix): refused, saying what it may
    contain."""
    from lpcvlab.tracking.registry import RegisterError, check_registry_name

    try:
        return check_registry_name(text)
    except RegisterError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_store_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", help=STORE_HELP)


def store_uri(args: argparse.Namespace) -> str:
    from lpcvlab.tracking.runstore import tracking_uri

    return tracking_uri(args.tracking_uri)


def store_client(args: argparse.Namespace) -> Any:
    """A client of the store that retries SQLite's "database is locked" (a sweep may be writing)."""
    from lpcvlab.tracking.runstore import open_store
    from lpcvlab.tracking.store import RetryingClient

    return RetryingClient(open_store(store_uri(args)))
