"""``lpcvlab hub ...``: AI Hub helpers that need an account but no Hydra config.

The main CLI calls :func:`add_hub_commands` with its subparsers; every verb sets
``func(args) -> int`` as its default.
"""

from __future__ import annotations

import argparse


def add_hub_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``hub devices`` (and the ``hub`` group) on the main CLI's subparsers."""
    hub = subparsers.add_parser("hub", help="Qualcomm AI Hub helpers (needs an API token)")
    verbs = hub.add_subparsers(dest="hub_command", metavar="VERB", required=True)
    devices = verbs.add_parser(
        "devices",
        help="list the AI Hub devices this account can target (values for device.aihub_name)",
    )
    devices.add_argument(
        "--attribute",
        action="append",
        default=[],
        metavar="ATTR",
        help="only devices with this attribute, e.g. framework:qnn or chipset:qualcomm-qcs9075 "
        "(repeatable)",
    )
    devices.set_defaults(func=devices_command)


def devices_command(args: argparse.Namespace) -> int:
    """Print one device name per line, so that it can be pasted into device.aihub_name.

    When AI Hub cannot be reached, one line says so within the default ``hub.connect_timeout_s``
    instead of after the client's retries.
    """
    from lpcvlab.config.schema import AIHubConfig
    from lpcvlab.hubs.aihub.client import list_devices, make_client, probe

    client = make_client()
    probe(client.config.api_url, AIHubConfig().connect_timeout_s)
    names = list_devices(client, attributes=list(getattr(args, "attribute", []) or []))
    for name in names:
        print(name)
    if not names:
        print("(no devices match)")
    return 0
