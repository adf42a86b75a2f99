"""What a run's charts open on: validation per epoch, counts as params (not one-point bars)."""

from __future__ import annotations

from lpcvlab_runs import seeded_store
from mlflow.tracking import MlflowClient

from lpcvlab.tracking.recorder import counts
from lpcvlab.training.fit import SharedRunMLFlowLogger


def test_validation_metrics_take_the_epoch_as_their_step(tmp_path):
    uri = seeded_store(tmp_path)
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("charts", artifact_location=(tmp_path / "a").as_uri())
    run_id = client.create_run(exp).info.run_id
    logger = SharedRunMLFlowLogger(tracking_uri=uri, run_id=run_id)
    for epoch in range(3):
        step = 40 * (epoch + 1) - 1  # Lightning's optimizer steps at the epoch's end
        logger.log_metrics({"train/loss_step": 1.0 / (epoch + 1)}, step)
        logger.log_metrics({"val/top1": 0.3 + epoch / 10, "epoch": float(epoch)}, step)
        logger.log_metrics({"train/loss": 2.0 - epoch, "epoch": float(epoch)}, step)

    def steps(key: str) -> list[int]:
        return [p.step for p in client.get_metric_history(run_id, key)]

    assert steps("val/top1") == [0, 1, 2]
    assert steps("train/loss") == [39, 79, 119] and steps("train/loss_step") == [39, 79, 119]
    assert steps("epoch") == [39, 39, 79, 79, 119, 119]


def test_counts_are_written_as_integers():
    assert counts({"data/images": 12.0, "x": 0.5, "n": 3}) == {
        "data/images": "12",
        "x": "0.5",
        "n": "3",
    }
