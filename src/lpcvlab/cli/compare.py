"""``lpcvlab compare``: the verb over :mod:`lpcvlab.tracking.compare`."""

from __future__ import annotations

import argparse
from pathlib import Path

from lpcvlab.cli.common import add_store_argument, module_doc, run_id, store_uri
from lpcvlab.errors import LpcvlabError


def add_compare_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="compare runs: swept params, accuracy, latency and memory per component",
        description=module_doc("lpcvlab.tracking.compare"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "run_ids",
        nargs="*",
        type=run_id,
        metavar="RUN_ID",
        help="runs to compare; a single sweep parent ID compares its children",
    )
    p.add_argument("--experiment", "-e", help="every run of this MLflow experiment")
    p.add_argument(
        "--sweep", "-s", type=run_id, metavar="PARENT_RUN_ID", help="the children of a sweep"
    )
    add_store_argument(p)
    p.add_argument("--csv", metavar="FILE", help="also write the full table as CSV")
    p.add_argument("--plot", metavar="FILE.png", help="also write the accuracy-vs-latency plot")
    p.set_defaults(func=compare_command)


def compare_command(args: argparse.Namespace) -> int:
    from lpcvlab.tracking import compare
    from lpcvlab.tracking.compare import (
        accuracy_latency,
        build_comparison,
        gate_failed,
        pareto_front,
        plot_pareto,
        select_runs,
    )

    uri = store_uri(args)
    runs, source = select_runs(uri, args.run_ids, args.experiment, args.sweep)
    if not runs:
        raise LpcvlabError(f"no runs in {source} at {uri}")
    comparison = build_comparison(runs)
    print(f"{len(runs)} run(s) from {source} ({uri})")
    if comparison.swept:
        print("differ in: " + ", ".join(compare.param_column(p) for p in comparison.swept))
    print(comparison.render())
    front = pareto_front(accuracy_latency(comparison.runs))
    if front:
        print(
            "\nPareto front (higher accuracy, lower total latency): "
            + ", ".join(f"{runs[i].short_id} ({compare.label(comparison, i)})" for i in front)
        )
    best = compare.best_run(runs)
    if best is not None:
        latency = best.metrics.get(compare.TOTAL_LATENCY, float("nan"))
        print(
            f"Best: {best.short_id} ({compare.label(comparison, runs.index(best))}), objective "
            f"{best.metrics[compare.OBJECTIVE]:.4f}, {compare.TOTAL_LATENCY} {latency:.3f} ms "
            "(a tie in the objective goes to the lower latency, then to the earlier job)"
        )
    failed = [r for r in runs if gate_failed(r)]
    if failed:
        print(
            "Failed the fidelity gate (left off the front): "
            + ", ".join(f"{r.short_id} ({r.tags.get('fidelity_gate_reasons', '')})" for r in failed)
        )
    if args.csv:
        print(f"table written to {comparison.to_csv(Path(args.csv))}")
    if args.plot:
        written = plot_pareto(comparison, Path(args.plot), title=source)
        print(f"Pareto plot written to {written}" if written else "no run has accuracy and latency")
    return 0
