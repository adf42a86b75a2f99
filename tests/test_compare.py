"""``lpcvlab compare``: the swept columns, the Pareto front, the table, the CLI on a real store."""

from __future__ import annotations

import csv
import math

import pytest
from lpcvlab_runs import seeded_store
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from lpcvlab import cli
from lpcvlab.tracking.compare import (
    MAX_LABELS,
    best_run,
    build_comparison,
    is_setting,
    pareto_front,
    plot_key,
    plot_numbers,
    plot_pareto,
    swept_params,
)
from lpcvlab.tracking.runstore import RunInfo, RunLookupError
from lpcvlab.tracking.sweep import (
    NOTE_LIMIT,
    SweepSummary,
    _note,
    fitting_table,
    summarise_sweep,
    summary_text,
)


def _run(run_id: str, params: dict, metrics: dict, tags: dict | None = None) -> RunInfo:
    return RunInfo(run_id, run_id, "FINISHED", "1", 0, params, metrics, tags or {})


def test_a_group_choice_shows_as_one_column_and_explicit_overrides_still_show():
    tiny = {"backbone.name": "clip_tiny", "backbone.width": "64", "seed": "0", "export.opset": "18"}
    b32 = {"backbone.name": "clip_vit_b32", "backbone.width": "768", "seed": "0"}
    b32 |= {"export.opset": "18"}
    runs = [_run("a", tiny, {}), _run("b", b32, {})]
    assert swept_params(runs) == ["backbone.name"]  # width comes with the choice
    wider = _run("c", tiny | {"backbone.width": "128", "seed": "1"}, {})
    assert swept_params([*runs, wider]) == ["backbone.name", "backbone.width", "seed"]
    assert swept_params(runs[:1]) == []


def test_pareto_front_keeps_runs_nothing_beats():
    points = [(10.0, 0.5), (5.0, 0.4), (20.0, 0.7), (12.0, 0.45), (5.0, 0.3), (math.nan, 0.9)]
    assert pareto_front(points) == [1, 0, 2]
    assert pareto_front([]) == []


def test_table_has_params_accuracy_and_per_component_latency_memory():
    metrics = {
        "recall_at_10": 0.5,
        "objective": 0.5,
        "latency_ms/image_encoder": 3.0,
        "peak_memory_mb/image_encoder": 10.0,
        "latency_ms/text_encoder": 1.0,
        "peak_memory_mb/text_encoder": 5.0,
        "latency_ms/total": 4.0,
    }
    runs = [
        _run("r1", {"preprocess.name": "lpcvc_sample"}, metrics, {"weights": "random"}),
        _run("r2", {"preprocess.name": "clip_mean_std"}, metrics | {"recall_at_10": 0.6}),
    ]
    table = build_comparison(runs)
    assert table.components == ["image_encoder", "text_encoder"]
    for col in ("preprocess", "recall_at_10", "latency_ms/image_encoder", "weights", "runtime"):
        assert col in table.columns
    assert table.rows[1]["recall_at_10"] == 0.6 and table.rows[0]["weights"] == "random"
    text = table.render()
    assert "clip_mean_std" in text and "latency_ms/text_encoder" in text
    assert "over_budget" not in text  # empty for every run: left out of the terminal table


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A parent run with three children, written directly (no pipeline needed)."""
    uri = seeded_store(tmp_path_factory.mktemp("store"))
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("lpcvc-retrieval")
    parent = client.create_run(exp, run_name="sweep backbone=...", tags={"sweep": "true"})
    children = {}
    for backbone, recall, latency in (("clip_tiny", 0.3, 2.0), ("clip_vit_b32", 0.6, 9.0),
                                      ("mobileclip2_s0", 0.5, 12.0)):  # fmt: skip
        run = client.create_run(
            exp, run_name=backbone, tags={"mlflow.parentRunId": parent.info.run_id}
        )
        client.log_batch(
            run.info.run_id,
            metrics=[
                Metric("recall_at_10", recall, 0, 0),
                Metric("objective", recall, 0, 0),
                Metric("latency_ms/image_encoder", latency * 0.8, 0, 0),
                Metric("latency_ms/text_encoder", latency * 0.2, 0, 0),
                Metric("latency_ms/total", latency, 0, 0),
                Metric("peak_memory_mb/image_encoder", 100.0, 0, 0),
            ],
            params=[
                Param("backbone.name", backbone),
                Param("track.objective", "recall_at_10"),
                Param("seed", "0"),
            ],
            tags=[
                RunTag("weights", "random"),
                RunTag("runtime", "qnn_dlc"),
                RunTag("hub", "local"),
            ],
        )
        client.set_terminated(run.info.run_id)
        children[backbone] = run.info.run_id
    return uri, parent.info.run_id, children


def test_compare_cli_on_a_sweep_parent_writes_table_and_plot(store, tmp_path, capsys):
    uri, parent, children = store
    csv_path, png = tmp_path / "t.csv", tmp_path / "p.png"
    code = cli.main(
        ["compare", parent, "--tracking-uri", uri, "--csv", str(csv_path), "--plot", str(png)]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert f"3 run(s) from sweep {parent}" in out and "differ in: backbone" in out
    front = out.split("Pareto front", 1)[1]
    assert children["clip_tiny"][:8] in front and children["clip_vit_b32"][:8] in front
    assert children["mobileclip2_s0"][:8] not in front  # slower and less accurate than b32
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert {r["run_id"] for r in rows} == set(children.values())
    assert {r["backbone"] for r in rows} == set(children)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_compare_by_experiment_and_by_ids(store, capsys):
    uri, parent, children = store
    assert cli.main(["compare", "--experiment", "lpcvc-retrieval", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert out.startswith("3 run(s) from experiment")  # the sweep parent is not a row
    ids = [children["clip_tiny"], children["clip_vit_b32"]]
    assert cli.main(["compare", *ids, "--tracking-uri", uri]) == 0
    assert "2 run(s)" in capsys.readouterr().out


def test_compare_errors_say_what_to_pass(store, tmp_path, capsys):
    uri, _, _ = store
    assert cli.main(["compare", "--experiment", "nope", "--tracking-uri", uri]) == 1
    assert "lpcvc-retrieval" in capsys.readouterr().err  # lists the experiments there
    assert cli.main(["compare", "0" * 32, "--tracking-uri", uri]) == 1
    assert "--tracking-uri" in capsys.readouterr().err
    missing = f"sqlite:///{tmp_path}/none/mlflow.db"
    assert cli.main(["compare", "--experiment", "x", "--tracking-uri", missing]) == 1
    assert "no MLflow store" in capsys.readouterr().err
    with pytest.raises(RunLookupError):
        from lpcvlab.tracking.compare import select_runs

        select_runs(missing, experiment="x")


QUOTED = "0123456789abcdef0123456789abcde'"  # a run ID with a quote: once pasted into a filter


@pytest.mark.parametrize(
    "argv",
    [
        ["compare", QUOTED],
        ["compare", "--sweep", QUOTED],
        ["compare", "0123abcd"],  # a short ID from a table
        ["reproduce", QUOTED],
        ["register", QUOTED],
        ["submit", QUOTED, "--dry-run"],
    ],
)
def test_every_verb_refuses_what_is_not_a_run_id_saying_what_one_is(argv, tmp_path, capsys):
    missing = f"sqlite:///{tmp_path}/none/mlflow.db"  # refused before any store is looked at
    with pytest.raises(SystemExit) as stop:
        cli.main([*argv, "--tracking-uri", missing])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "is not a run ID: expected 32 hexadecimal digits" in err
    assert "Traceback" not in err and "MlflowException" not in err and "no MLflow store" not in err


@pytest.mark.parametrize("verb", ["register", "submit"])
def test_a_registry_name_with_a_quote_is_refused_saying_what_it_may_hold(verb, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main([verb, "0" * 32, "--name", "candidates'x"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert '"candidates\'x" cannot name a registered model: expected letters, digits' in err


def test_the_library_checks_ids_before_they_reach_a_filter(store, tmp_path):
    from lpcvlab.tracking.compare import select_runs
    from lpcvlab.tracking.runstore import child_runs, get_run, open_store

    uri, _, _ = store
    client = open_store(uri)
    for lookup in (child_runs, get_run):
        with pytest.raises(RunLookupError, match="is not a run ID"):
            lookup(client, QUOTED)
    missing = f"sqlite:///{tmp_path}/none/mlflow.db"
    with pytest.raises(RunLookupError, match="is not a run ID"):  # the argument, not the store
        select_runs(missing, [QUOTED])
    with pytest.raises(RunLookupError, match="is not a run ID"):
        select_runs(missing, sweep=QUOTED)


# ----------------------------------------------------------------------------- the best run


def test_the_best_run_is_the_one_a_participant_would_submit():
    """The highest objective; a tie goes to the lower total latency, then to the earlier job;
    runs that did not finish or have no objective are not candidates."""
    slow = _run("slow", {}, {"objective": 0.5, "latency_ms/total": 29.4}, {"sweep_job": "0"})
    fast = _run("fast", {}, {"objective": 0.5, "latency_ms/total": 16.4}, {"sweep_job": "1"})
    twin = _run("twin", {}, {"objective": 0.5, "latency_ms/total": 16.4}, {"sweep_job": "2"})
    worse = _run("worse", {}, {"objective": 0.4, "latency_ms/total": 1.0}, {"sweep_job": "3"})
    assert best_run([slow, fast, twin, worse]).run_id == "fast"
    assert best_run([twin, fast]).run_id == "fast"  # the earlier job, whatever the order
    better = _run("better", {}, {"objective": 0.6, "latency_ms/total": 99.0})
    assert best_run([slow, fast, better]).run_id == "better"
    failed = RunInfo("x", "x", "FAILED", "1", 0, {}, {"objective": 0.9}, {})
    assert best_run([failed, slow]).run_id == "slow"
    assert best_run([failed]) is None
    no_latency = _run("nolat", {}, {"objective": 0.5}, {"sweep_job": "0"})
    assert best_run([no_latency, fast]).run_id == "fast"


def test_differ_in_lists_settings_never_what_a_run_derived():
    common = {"backbone.name": "clip_tiny", "seed": "0"}
    derived_a = {"onnx_ops/image_encoder/Gelu": "2", "compute_units/image_encoder/npu": "10"}
    derived_a |= {"data/images": "8", "normalization": "mean/std in the graph"}
    derived_a |= {"threads.torch_intra_op": "1", "calibration_samples/text_encoder": "32"}
    derived_b = {k: v + "0" for k, v in derived_a.items()}
    runs = [
        _run("a", common | {"preprocess.name": "lpcvc_sample"} | derived_a, {}),
        _run("b", common | {"preprocess.name": "clip_mean_std"} | derived_b, {}),
    ]
    assert swept_params(runs) == ["preprocess.name"]
    assert is_setting("hub.profile_iterations") and is_setting("seed")
    assert not is_setting("onnx_ops/image_encoder/Gelu") and not is_setting("normalization")


def test_a_sweep_with_a_tie_names_the_faster_run_best_in_its_tags_and_in_compare(tmp_path, capsys):
    """The first job ties the second on the objective but is slower: the parent's tag, its
    summary and `lpcvlab compare` name the second."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("lpcvc-retrieval")
    parent = client.create_run(exp, run_name="sweep seed=0,1", tags={"sweep": "true"}).info.run_id
    ids = {}
    for job, latency in ((0, 29.4), (1, 16.4)):  # the first job (listed first) is the slower
        run = client.create_run(
            exp,
            run_name=f"clip_tiny seed={job}",
            tags={"mlflow.parentRunId": parent, "sweep_job": str(job)},
        ).info.run_id
        client.log_batch(
            run,
            metrics=[
                Metric("recall_at_10", 0.25, 0, 0),
                Metric("objective", 0.25, 0, 0),
                Metric("latency_ms/total", latency, 0, 0),
                Metric("latency_ms/image_encoder", latency, 0, 0),
            ],
            params=[Param("seed", str(job)), Param("onnx_ops/image_encoder/Add", str(job))],
        )
        client.set_terminated(run)
        ids[job] = run
    summary = summarise_sweep(client, parent, tmp_path / "multirun")
    assert summary.best_run_id == ids[1]
    assert client.get_run(parent).data.tags["best_run_id"] == ids[1]
    assert ids[1] in summary_text(summary, parent)
    assert cli.main(["compare", parent, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert f"Best: {ids[1][:8]} (seed=1)" in out
    assert "differ in: seed\n" in out  # not the operator counts


def test_a_big_sweep_description_stays_under_mlflows_limit():
    """The parent's description holds as much of the table as fits in 8,000 characters, best
    runs first, and says the rest is in sweep_runs.csv."""
    metrics = {f"latency_ms/component_{c}": 1.0 + c for c in range(6)}
    runs = [
        _run(
            f"{i:032x}",
            {"seed": str(i), "preprocess.name": f"p{i % 3}", "hub.profile_iterations": str(i)},
            metrics | {"objective": i / 500, "latency_ms/total": 20.0, "recall_at_10": i / 500},
            {"sweep_job": str(i)},
        )
        for i in range(300)
    ]
    comparison = build_comparison(runs)
    assert len(comparison.render()) > NOTE_LIMIT
    table = fitting_table(comparison, NOTE_LIMIT // 2)
    assert len(table) <= NOTE_LIMIT // 2 and "sweep_runs.csv" in table
    assert f"{299:032x}"[:8] in table  # the best run is shown
    best = best_run(runs)
    summary = SweepSummary(300, 300, 0, 300, 0, best.run_id, 0.598, "recall_at_10", table)
    note = _note(summary_text(summary, "p" * 32), summary, "1")
    assert len(note) <= NOTE_LIMIT
    assert len(_note("x" * 9000, summary, "1")) <= NOTE_LIMIT  # whatever the summary's length


def test_the_pareto_plot_numbers_points_best_first_with_their_swept_values_only(tmp_path):
    runs = [
        _run(
            f"{i:032x}",
            {"seed": str(i % 2), "preprocess.name": f"p{i // 2}", "onnx_ops/x/Add": str(i)},
            {"objective": (i % 3) / 10, "latency_ms/total": 10.0 - i, "recall_at_10": (i % 3) / 10},
            {"sweep_job": str(i)},
        )
        for i in range(6)
    ]
    comparison = build_comparison(runs)
    shown = plot_numbers(comparison, range(6))
    assert [runs[i].run_id for i in shown[:2]] == [runs[5].run_id, runs[2].run_id]  # ties: faster
    key = plot_key(comparison, shown)
    assert key[0] == "best first: preprocess / seed" and key[1] == " 1  p2 / 1"
    assert not any("onnx_ops" in line or "Add" in line for line in key)
    assert plot_pareto(comparison, tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    slow = {"objective": 0.0, "latency_ms/total": 50.0}
    many = [*runs, *(_run(f"{i:032x}", {"seed": str(i)}, slow) for i in range(6, 40))]
    big = build_comparison(many)
    numbered = plot_numbers(big, range(len(many)))
    assert len(numbered) < MAX_LABELS and runs[5].run_id == many[numbered[0]].run_id
    assert plot_key(big, numbered, len(many) - len(numbered))[-1].endswith("more: sweep_runs.csv)")
