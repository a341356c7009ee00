from lightning_slim.reporting.report import CompressionReport


def _check(trainer, module, cb):
    assert cb.before["params"] == cb.after["params"] > 0
    assert cb.after["size_bytes"] > 0 and cb.after["macs"] > 0
    assert 0.0 <= cb.after["export_accuracy"] <= 1.0
    # the exported copy of an uncompressed model predicts exactly what the module predicts
    assert abs(cb.after["export_accuracy"] - cb.after["accuracy"]) < 1e-6
    assert cb.json_path.exists()


CASES = [
    __import__("cases").Case(
        name="compression_report",
        callback=lambda: CompressionReport(accuracy_metric="val/acc", measure_latency=False),
        check=_check,
        wandb_keys=("slim/report/deployed/params", "slim/report/fit_start/size_bytes", "slim/report/trained/accuracy"),
    )
]
