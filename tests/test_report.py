import time

from PIL import Image

from attar.report import format_cell, markdown_table, render_compare_table, write_report
from attar.report.tables import MISSING, human_bytes, human_count
from attar.store import CompareRow

ROWS = [
    {"model": "teacher convnet w64", "accuracy": 0.8665, "nll": 0.3712, "ece": 0.0231, "params": 80650,
     "bytes": 330_000, "latency_ms_b1": 0.412, "latency_ms_b256": 12.5},  # attar.models.model_size keys
    {"model": "student convnet w8", "accuracy": 0.8238, "nll": 0.5011, "ece": None, "params": 4626,
     "size_bytes": 21_500, "teacher mode": "cached"},  # alias of "bytes"
    {"model": "big", "accuracy": 0.91, "params": 22_713_000, "size_bytes": 90_900_000},
]
CURVES = {
    "teacher": {"loss": [(0, 2.3), (100, 1.1), (200, 0.7)], "val/accuracy": [(100, 0.7), (200, 0.8)]},
    "student": {"train/loss": [(0, 2.2), (50, 1.5)], "val_acc": [(50, 0.6)], "lr": [(0, 0.001)]},
}


def test_formatting():
    assert format_cell("accuracy", 0.8665) == "86.65%"
    assert format_cell("nll", 0.37123) == "0.3712"
    assert format_cell("ece", None) == MISSING and format_cell("ece", float("nan")) == MISSING
    assert human_count(4626) == "4,626" and human_count(22_713_000) == "22.71M"
    assert human_bytes(512) == "512 B" and human_bytes(21_500) == "21.5 KB" and human_bytes(90_900_000) == "90.90 MB"
    assert format_cell("teacher mode", "cached") == "cached"
    assert format_cell("latency_ms_b32", 1234.5) == "1234.5" and format_cell("steps", 3) == "3"


def test_markdown_table_columns_and_missing():
    md = markdown_table(ROWS)
    header = md.splitlines()[0]
    for col in ("model", "accuracy", "NLL", "ECE", "params", "size", "latency b1 (ms)", "latency b256 (ms)", "teacher mode"):
        assert col in header
    assert header.index("latency b256") < header.index("teacher mode")  # extras come last
    student = next(line for line in md.splitlines() if "student" in line)
    cells = [c.strip() for c in student.strip("|").split("|")]
    assert cells == ["student convnet w8", "82.38%", "0.5011", MISSING, "4,626", "21.5 KB", MISSING, MISSING, "cached"]
    assert markdown_table([{"model": "a|b"}]).count("a\\|b") == 1
    assert "latency b32 (ms)" in markdown_table([{"stage": "s", "latency_ms_b32": 1.0}])


def test_write_report(tmp_path):
    t = time.perf_counter()
    paths = write_report(tmp_path / "run", "Quickstart: KD on Fashion-MNIST", ROWS, CURVES,
                         ["KD helps with few labels.", "Latency on 2 CPU cores <b>"])
    elapsed = time.perf_counter() - t
    assert set(paths) == {"markdown", "html", "learning_curves", "accuracy_vs_params"}
    md = paths["markdown"].read_text()
    for number in ("86.65%", "0.3712", "0.0231", "80,650", "330.0 KB", "0.412", "12.50", "4,626", "22.71M", "90.90 MB", "cached"):
        assert number in md
    assert "![Learning curves](learning_curves.png)" in md and "- KD helps with few labels." in md
    page = paths["html"].read_text()
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert 'src="learning_curves.png"' in page and 'src="accuracy_vs_params.png"' in page
    assert "86.65%" in page and "&lt;b&gt;" in page  # notes are escaped
    assert "http" not in page  # self-contained: nothing fetched from elsewhere
    for key in ("learning_curves", "accuracy_vs_params"):
        assert paths[key].stat().st_size > 0
        with Image.open(paths[key]) as im:
            im.verify()
        with Image.open(paths[key]) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    assert not list((tmp_path / "run").glob(".*.tmp"))
    assert elapsed < 10  # typically well under 1 s once matplotlib is imported


def test_report_without_plottable_data(tmp_path):
    paths = write_report(tmp_path, "Empty", [{"stage": "eval", "accuracy": None}], {"s": {"lr": [(0, 0.1)]}}, [])
    assert set(paths) == {"markdown", "html"}
    md = paths["markdown"].read_text()
    assert "| stage |" in md and "png" not in md and "Notes" not in md
    paths = write_report(tmp_path / "none", "No rows", [], {}, [])
    assert "No results" in paths["markdown"].read_text()


def test_compare_table_renders():
    from rich.console import Console

    rows = [CompareRow("train", "loss", 1.0, 0.5, -0.5), CompareRow("eval", "accuracy", 0.80, 0.85, 0.05),
            CompareRow("eval", "only_a", 1.0, None, None)]
    console = Console(record=True, width=120)
    rows.append(CompareRow("eval", "test_nll", 0.5, 0.25, -0.25))
    console.print(render_compare_table(rows, "run-a", "run-b"))
    text = console.export_text()
    for s in ("loss", "80.00%", "85.00%", "+5.00 pp", "-0.5", MISSING, "run-a", "run-b", "0.2500"):
        assert s in text


def test_single_point_scatter(tmp_path):
    paths = write_report(tmp_path, "One", [{"model": "m", "accuracy": 0.5, "params": 1000}], {}, [])
    assert "accuracy_vs_params" in paths and "learning_curves" not in paths
