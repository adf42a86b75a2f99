"""MLflow-native runs: datasets, logged models, the registry, descriptions, source tags and system
metrics, read back through the MLflow client -- and the run pages in a real browser.

One small ``clip_tiny`` sweep (two children that share their text encoder) serves the slow tests;
the browser test (marker ``ui``) starts ``mlflow server`` over it while the sweep runs and reads the
pages with selenium, through the ``chromedriver`` the distribution builds with its ``chromium``
(always the same version; Playwright drives its own pinned browser builds, which cannot be
downloaded here).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import mlflow
import mlflow.onnx
import pytest
from conftest import compose_config
from lpcvlab_runs import TINY, explain, run_py, seeded_store, store_overrides
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from test_sweeps import _free_port, _stop, _wait_ready

from lpcvlab import cli, pipeline
from lpcvlab.config import load_settings
from lpcvlab.data.track1 import content_sha256, read_track1
from lpcvlab.errors import DataError
from lpcvlab.tracking.naming import command_line
from lpcvlab.tracking.recorder import NOTE_TAG, start_run, system_metrics_on
from lpcvlab.tracking.registry import RegisterError, register_run
from lpcvlab.tracking.runstore import RunInfo
from lpcvlab.tracking.views import ui_link

IMAGE, TEXT = "image_encoder", "text_encoder"
SWEEP = [
    "-m",
    *TINY,
    "preprocess=lpcvc_sample,clip_mean_std",
    "sweep.register_best=true",
    "tracking.system_metrics=true",
    "tracking.system_metrics_interval_s=1",
]
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=2400,1400",
)


def browser_missing() -> str | None:
    """Why the browser test cannot run here (None when it can)."""
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        return "no Chromium (apt-get install chromium chromium-driver; .ci/run does)"
    if not shutil.which("chromedriver"):
        return "no chromedriver (apt-get install chromium-driver; .ci/run does)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


@dataclass
class Sweep:
    tmp: Path
    uri: str
    client: MlflowClient
    parent: RunInfo
    children: dict[str, RunInfo]  # by preprocess
    best: RunInfo
    server: subprocess.Popen | None
    url: str


# ----------------------------------------------------------------------------- fast


@pytest.mark.parametrize(
    ("overrides", "on"),
    [
        ([], False),  # train=none
        (["track=video"], True),  # train=finetune
        (["track=video", "tracking.system_metrics=false"], False),
        (["tracking.system_metrics=true"], True),
    ],
)
def test_system_metrics_are_on_when_training_unless_set(overrides, on):
    assert system_metrics_on(load_settings(compose_config(*overrides))) is on


def test_the_command_line_tag_masks_secret_values():
    argv = ["run.py", "-m", "seed=0,1", "hub.api_token=qaihub-secret", "+password=x"]
    command = command_line(argv)
    assert command.startswith("python run.py -m seed=0,1 ")
    assert "qaihub-secret" not in command and "'hub.api_token=***'" in command
    assert command_line(["/venv/bin/lpcvlab", "register", "abc"]) == "lpcvlab register abc"


# ----------------------------------------------------------------------------- a sweep


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("native")
    uri = seeded_store(tmp)
    client = MlflowClient(tracking_uri=uri)
    client.search_experiments()  # creates the store, so that the server and the sweep share it
    server, url, log = None, "", None
    if browser_missing() is None:  # the server starts (tens of seconds) while the sweep runs
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(tmp / "server.log", "w")
        server = subprocess.Popen(
            [
                sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                "--default-artifact-root", str(tmp / "artifacts"),
                "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        proc = run_py(*SWEEP, *store_overrides(tmp))
        assert proc.returncode == 0, explain(proc)
        from lpcvlab.tracking.runstore import search

        runs = search(client, [e.experiment_id for e in client.search_experiments()])
        (parent,) = [r for r in runs if r.tags.get("sweep") == "true"]
        children = {r.params["preprocess.name"]: r for r in runs if r is not parent}
        best = next(r for r in runs if r.run_id == parent.tags["best_run_id"])
        yield Sweep(tmp, uri, client, parent, children, best, server, url)
    finally:
        if server is not None:  # nothing to save: no need to wait for a graceful end
            _stop(server, grace_s=3)
        if log is not None:
            log.close()


def _models(client: MlflowClient, run_id: str) -> dict[str, object]:
    outputs = client.get_run(run_id).outputs.model_outputs
    models = [client.get_logged_model(o.model_id) for o in outputs]
    return {m.tags["component"]: m for m in models}


# ----------------------------------------------------------------------------- the client


@pytest.mark.slow
def test_children_log_the_data_they_read_with_one_content_digest(sweep):
    digests = set()
    for child in sweep.children.values():
        (data,) = sweep.client.get_run(child.run_id).inputs.dataset_inputs
        assert data.dataset.name == "demo_retrieval"
        assert json.loads(data.dataset.source) == {"uri": "demo"}
        assert {t.key: t.value for t in data.tags} == {"mlflow.data.context": "evaluation"}
        profile = json.loads(data.dataset.profile)
        assert profile["images"] == 8 and data.dataset.digest == profile["sha256"][:16]
        digests.add(profile["sha256"])
    # The same files (preprocessing differs) give the same digest: the files' content hash.
    root = sweep.tmp / "cache" / "demo" / "retrieval" / "n8-seed0"
    ds = read_track1(root)
    expected = content_sha256(root, ["img_list.csv", "txt_list.csv"], ds.images)
    assert digests == {expected}


@pytest.mark.slow
def test_exports_are_onnx_models_stored_once_per_file_and_linked_to_metrics(sweep):
    client = sweep.client
    by_child = {p: _models(client, c.run_id) for p, c in sweep.children.items()}
    for preprocess, models in by_child.items():
        run = sweep.children[preprocess]
        assert set(models) == {IMAGE, TEXT}
        for comp, model in models.items():
            assert model.tags["onnx_sha256"] == run.tags[f"onnx_sha256/{comp}"]
            keys = {(m.key, m.run_id, m.dataset_digest) for m in model.metrics}
            assert (f"latency_ms/{comp}", run.run_id, None) in keys
            digest = client.get_run(run.run_id).inputs.dataset_inputs[0].dataset.digest
            assert ("recall_at_10", run.run_id, digest) in keys
    # The text encoder does not depend on the image preprocessing: one file, one model.
    assert by_child["lpcvc_sample"][TEXT].model_id == by_child["clip_mean_std"][TEXT].model_id
    assert by_child["lpcvc_sample"][IMAGE].model_id != by_child["clip_mean_std"][IMAGE].model_id
    exp = sweep.parent.experiment_id
    assert len(client.search_logged_models([exp])) == 3

    model = by_child["clip_mean_std"][IMAGE]
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{model.artifact_location}/model.onnx", dst_path=str(sweep.tmp / "dl")
    )
    assert hashlib.sha256(Path(local).read_bytes()).hexdigest() == model.tags["onnx_sha256"]
    mlflow.set_tracking_uri(sweep.uri)
    info = mlflow.models.get_model_info(f"models:/{model.model_id}")
    assert info.flavors.keys() >= {"onnx"}
    (inp,) = info.signature.inputs.inputs
    assert (inp.name, inp.shape, str(inp.type)) == ("image", (1, 3, 224, 224), "float32")
    text = mlflow.models.get_model_info(f"models:/{by_child['clip_mean_std'][TEXT].model_id}")
    (tok,) = text.signature.inputs.inputs
    assert (tok.name, tok.shape, str(tok.type)) == ("text", (1, 77), "int64")
    assert [o.name for o in text.signature.outputs.inputs] == ["output_0"]
    loaded = mlflow.onnx.load_model(f"models:/{model.model_id}")
    assert [i.name for i in loaded.graph.input] == ["image"]


@pytest.mark.slow
def test_children_read_well_description_source_and_system_metrics(sweep):
    for preprocess, child in sweep.children.items():
        note = child.tags[NOTE_TAG]
        assert note.startswith("```text\nResults: track=retrieval backbone=clip_tiny")
        for words in ("precision=fp32", "weights=random", "recall_at_10", "latency ms", "IMAGE"):
            assert words.replace("IMAGE", IMAGE) in note, (words, note)
        assert child.tags["mlflow.source.name"] == "run.py"
        command = child.tags["command"]
        assert command.startswith("python run.py ") and f"preprocess={preprocess}" in command
        assert " -m " not in command  # the job's own command, not the sweep's
        assert any(k.startswith("system/") for k in child.metrics), sorted(child.metrics)
    assert "Stage cache: reused text_encoder" in sweep.children["clip_mean_std"].tags[NOTE_TAG]


@pytest.mark.slow
def test_parent_links_its_best_child_which_is_registered(sweep):
    parent, best, client = sweep.parent, sweep.best, sweep.client
    # Each child is named by what it sweeps: the link to the best one says which it is.
    names = {p: c.name for p, c in sweep.children.items()}
    assert names == {p: f"clip_tiny preprocess={p}" for p in ("lpcvc_sample", "clip_mean_std")}
    note = parent.tags[NOTE_TAG]
    assert note.startswith(f"Best run: [{best.name}]({ui_link(best.experiment_id, best.run_id)})")
    assert best.run_id in note and "2 job(s), 2 finished, 0 failed" in note
    assert "recall_at_10" in note and sweep.children["clip_mean_std"].run_id[:8] in note
    assert parent.tags["mlflow.source.name"] == "run.py"
    assert (
        " -m " in parent.tags["command"] and "lpcvc_sample,clip_mean_std" in parent.tags["command"]
    )

    models = _models(client, best.run_id)
    for comp in (IMAGE, TEXT):
        (version,) = client.search_model_versions(f"name = 'lpcvc-track1-{comp}'")
        assert version.run_id == best.run_id
        assert version.source == f"models:/{models[comp].model_id}"
        # The version's source is its logged model; the model's tag lists the version.
        linked = json.loads(models[comp].tags["mlflow.modelVersions"])
        assert {"name": f"lpcvc-track1-{comp}", "version": "1"} in linked
        tags = version.tags
        assert tags["precision"] == "fp32" and tags["device"] == "XR2 Gen 2 (Proxy)"
        assert tags["runtime"] == "qnn_dlc" and tags["hub"] == "local"
        assert float(tags["latency_ms"]) == pytest.approx(best.metrics[f"latency_ms/{comp}"])
        assert float(tags["recall_at_10"]) == pytest.approx(best.metrics["recall_at_10"])
        assert "aihub.compile_job" not in tags  # none on hub=local
        assert best.run_id in version.description
        assert client.get_run(best.run_id).data.tags[f"registered/{comp}"].endswith(" v1")
    assert "registered as lpcvc-track1-text_encoder version 1" in parent.tags["registered"]


@pytest.mark.slow
def test_register_verb_adds_a_version_once_and_refuses_a_failed_run(sweep, capsys):
    other = next(c for c in sweep.children.values() if c.run_id != sweep.best.run_id)
    args = ["register", other.run_id, "--tracking-uri", sweep.uri]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "text_encoder: registered as lpcvc-track1-text_encoder version 2" in out
    assert cli.main(args) == 0  # again: the same versions, none added
    assert "already registered as lpcvc-track1-text_encoder version 2" in capsys.readouterr().out
    found = sweep.client.search_model_versions("name = 'lpcvc-track1-text_encoder'")
    text = {str(v.version): v for v in found}
    assert set(text) == {"1", "2"} and text["1"].source == text["2"].source  # one shared file
    shared = sweep.client.get_logged_model(text["2"].source.removeprefix("models:/"))
    linked = json.loads(shared.tags["mlflow.modelVersions"])
    assert linked == [{"name": "lpcvc-track1-text_encoder", "version": v} for v in ("1", "2")]

    tracking = OmegaConf.create({"uri": sweep.uri, "artifact_root": str(sweep.tmp / "artifacts")})
    with pytest.raises(DataError):
        with start_run(tracking, "lpcvc-retrieval", "broken", {"track": "retrieval"}) as rec:
            raise DataError("data.root /nowhere is not a directory")
    assert cli.main(["register", rec.run_id, "--tracking-uri", sweep.uri]) == 1
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "Traceback" not in err
    assert line.startswith(f"error: run {rec.run_id} is FAILED (DataError: data.root /nowhere")
    assert "only a FINISHED run can be registered" in line
    assert not sweep.client.search_model_versions(f"run_id = '{rec.run_id}'")


@pytest.mark.slow
def test_without_logged_models_register_logs_the_cached_export(sweep, tmp_path):
    cfg = compose_config(
        *TINY,
        f"tracking.uri={seeded_store(tmp_path)}",
        f"tracking.artifact_root={tmp_path}/artifacts",
        f"paths.cache_dir={sweep.tmp}/cache",  # the sweep's exports, cached
        "tracking.log_models=false",
    )
    res = pipeline.run(cfg, work_dir=tmp_path / "work")
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    run = client.get_run(res.run_id)
    assert not run.outputs.model_outputs  # tracking.log_models=false
    assert not any(k.startswith("system/") for k in run.data.metrics)  # off when not training
    assert run.inputs.dataset_inputs[0].dataset.name == "demo_retrieval"
    versions = register_run(client, res.run_id, "candidates")
    assert {v.name for v in versions} == {"candidates-image_encoder", "candidates-text_encoder"}
    assert set(_models(client, res.run_id)) == {IMAGE, TEXT}

    # The same, once the cached ONNX files are gone: one line saying what to do.
    tracking = OmegaConf.create({"uri": f"sqlite:///{tmp_path}/other.db", "artifact_root": None})
    with start_run(tracking, "lpcvc-retrieval", "no models", {"track": "retrieval"}) as rec:
        rec.set_tags({f"onnx_sha256/{IMAGE}": "ab" * 32})
        rec.log_params({"paths.cache_dir": str(tmp_path / "emptied")})
    other = MlflowClient(tracking_uri=tracking.uri)
    with pytest.raises(RegisterError, match="tracking.log_models=true") as err:
        register_run(other, rec.run_id)
    assert "\n" not in str(err.value) and str(tmp_path / "emptied") in str(err.value)


# ----------------------------------------------------------------------------- the browser


def _finetune_run(sweep: Sweep, epochs: int = 2) -> str:
    """A short fine-tuning run in the sweep's store: its validation metrics, one per epoch."""
    cfg = compose_config(
        *TINY,
        "train=finetune",
        "data.demo.num_train_images=32",
        "train.batch_size=16",
        f"train.trainer.max_epochs={epochs}",
        "train.trainer.enable_progress_bar=false",
        "tracking.log_models=false",
        f"tracking.uri={sweep.uri}",
        f"tracking.artifact_root={sweep.tmp / 'artifacts'}",
        f"paths.cache_dir={sweep.tmp / 'cache'}",
    )
    run_id = pipeline.run(cfg, work_dir=sweep.tmp / "trained").run_id
    points = sweep.client.get_metric_history(run_id, "val/recall_at_10")
    assert sorted(p.step for p in points) == list(range(epochs))  # the epoch is the step
    return run_id


@pytest.mark.slow
@pytest.mark.ui
@pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing()))
def test_run_pages_in_headless_chromium(sweep):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    assert sweep.server is not None
    _wait_ready(sweep.url, sweep.server, timeout_s=120)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="lpcvlab-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)

    def page_text() -> str:
        return driver.find_element(By.TAG_NAME, "body").text

    def shows(*words: str, timeout: float = 60) -> str:
        try:
            WebDriverWait(driver, timeout).until(lambda d: all(w in page_text() for w in words))
        except Exception:
            driver.save_screenshot(str(sweep.tmp / "ui-failure.png"))
            missing = [w for w in words if w not in page_text()]
            (sweep.tmp / "ui-failure.txt").write_text(page_text())
            raise AssertionError(f"not on {driver.current_url}: {missing}") from None
        return page_text()

    parent, best = sweep.parent, sweep.best
    child = sweep.children["clip_mean_std"]
    exp = parent.experiment_id
    digest = sweep.client.get_run(child.run_id).inputs.dataset_inputs[0].dataset.digest
    trained = _finetune_run(sweep)  # a training run in the same store, for its charts
    try:
        # The README's link: the experiment's runs, not MLflow 3's GenAI (traces) page, in the
        # saved view whose columns are the objective, total latency, precision and backbone.
        driver.get(f"{sweep.url}/{ui_link(exp)}")
        shows(parent.name, "Run Name", "Dataset", "Models")
        shows("recall_at_10", "latency_ms/total", "precision", "backbone")
        row = f"//div[@role='row'][.//a[contains(@href, '/runs/{parent.run_id}')]]//button"
        driver.find_element(By.XPATH, row).click()  # unfold the sweep's children
        text = shows(*(c.name for c in sweep.children.values()), f"demo_retrieval ({digest})")
        assert IMAGE in text and TEXT in text  # the Models column

        driver.get(f"{sweep.url}/{ui_link(exp, child.run_id)}")
        text = shows("Description", "Results: track=retrieval", "Logged models (2)")
        assert f"demo_retrieval ({digest})" in text and "Evaluation" in text
        assert "Parent run" in text and parent.name in text
        assert "precision=fp32" in text and "run.py" in text

        driver.get(f"{sweep.url}/{ui_link(exp, parent.run_id)}")
        shows("Best run:", "2 job(s), 2 finished")
        href = driver.find_element(By.LINK_TEXT, best.name).get_attribute("href")
        assert f"/runs/{best.run_id}?" in urllib.parse.unquote(href)
        driver.get(href)  # (the description's links open in a new tab)
        shows("Logged models (2)", "Registered models", "lpcvc-track1-image_encoder")

        # The registered version is linked from its logged model's page.
        image = _models(sweep.client, best.run_id)[IMAGE]
        driver.get(f"{sweep.url}/#/experiments/{exp}/models/{image.model_id}")
        shows(IMAGE, "lpcvc-track1-image_encoder")

        # A per-epoch validation metric, charted on the training run's model metrics tab.
        # MLflow groups the charts by the key's prefix: a "val" and a "train" section, each
        # chart titled by the rest of the key; searching the full key leaves its chart.
        driver.get(f"{sweep.url}/#/experiments/{exp}/runs/{trained}/model-metrics")
        box = "//input[@placeholder='Search metric charts']"
        search = WebDriverWait(driver, 60).until(lambda d: d.find_element(By.XPATH, box))
        search.send_keys("val/recall_at_10")
        # one line chart over the steps (the epochs), in the val section
        shows("val\n(1)", "recall_at_10", "Step", "(val/recall_at_10)")
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
