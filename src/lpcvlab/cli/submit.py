"""``lpcvlab submit``: the verb over :mod:`lpcvlab.tracking.submit`."""

from __future__ import annotations

import argparse

from lpcvlab.cli.common import add_store_argument, module_doc, registry_name, run_id, store_client


def add_submit_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "submit",
        help="check a run against the submission rules, share its compile jobs, record it",
        description=module_doc("lpcvlab.tracking.submit"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_id", type=run_id, metavar="RUN_ID")
    p.add_argument("--dry-run", action="store_true", help="check and print; share nothing")
    p.add_argument(
        "--share-with",
        action="append",
        metavar="EMAIL",
        help="address to share the compile jobs with (repeatable; default: the run's "
        "submission.share_with, lowpowervision@gmail.com)",
    )
    p.add_argument(
        "--budget-ms", type=float, help="latency limit (default: the run's track.budget_ms)"
    )
    p.add_argument(
        "--name", type=registry_name, help="registered model prefix (as lpcvlab register --name)"
    )
    add_store_argument(p)
    p.set_defaults(func=submit_command)


def submit_command(args: argparse.Namespace) -> int:
    from lpcvlab.tracking import submit
    from lpcvlab.tracking.registry import components
    from lpcvlab.tracking.runstore import get_run

    client = store_client(args)
    result = submit.submit_run(
        client,
        args.run_id,
        dry_run=args.dry_run,
        share_with=args.share_with,
        budget_ms=args.budget_ms,
        registry_name=args.name,
    )
    print(f"run {args.run_id}: every check passed")
    for line in result.verdict.passed:
        print(f"  {line}")
    run = get_run(client, args.run_id)
    emails = submit.share_with_of(run, args.share_with)
    jobs = [f"{run.tags[f'aihub/{c}/compile_job']} ({c})" for c in components(run)]
    if result.record is None:
        print(f"dry run: would share {', '.join(jobs)} with {', '.join(emails)}; nothing shared")
        return 0
    for comp, added in result.shared.items():
        job = run.tags[f"aihub/{comp}/compile_job"]
        how = f"shared with {', '.join(added)}" if added else "already shared"
        print(f"  {comp}: compile job {job} {how}")
    print(
        f"  recorded: runs:/{args.run_id}/{submit.RECORD}; {', '.join(result.versions)} "
        f"(alias {submit.ALIAS})"
    )
    print(f"Next: the submission form asks for the compile job IDs: {', '.join(jobs)}")
    return 0
