import json

import pytest

from hpalign.report import MetricsLogger, format_eval_table, plot_training, read_metrics


def test_metrics_jsonl_tensorboard_and_plot(tmp_path):
    logger = MetricsLogger(tmp_path, report_to=["tensorboard"], config={"a": 1}, enabled=True, run_name="r")
    for step in range(1, 4):
        logger.log(step, {"train/loss": 1.0 / step, "train/rewards/margins": 0.1 * step})
    logger.log(3, {"eval/rewards/accuracies": 0.75})
    logger.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 3]
    assert records[1]["train/loss"] == pytest.approx(0.5)
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())
    png = plot_training(tmp_path / "metrics.jsonl", tmp_path / "training.png")
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = MetricsLogger(tmp_path, report_to=["wandb"], config={"beta": 0.1}, enabled=True, run_name="r")
    logger.log(1, {"train/loss": 0.7})
    logger.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and any(runs[0].glob("*.wandb"))
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["train/loss"] == 0.7


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path, report_to=["tensorboard"], config={}, enabled=False, run_name="r")
    logger.log(1, {"train/loss": 1.0})
    logger.close()
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "tensorboard").exists()


def test_eval_table_shows_before_and_after():
    table = format_eval_table({"eval/a": 0.5}, {"eval/a": 0.75, "eval/b": 1.0})
    assert "0.5000" in table and "0.7500" in table and "-" in table.splitlines()[2]


def test_eval_table_without_heldout_data():
    assert "no held-out" in format_eval_table(None, {})
