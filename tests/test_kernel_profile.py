"""bench/kernel_profile.py's summing of ncu's CSV (the profiling itself needs CUDA and ncu)."""

import importlib.util
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location(
    "kernel_profile", Path(__file__).resolve().parents[1] / "bench" / "kernel_profile.py")
kernel_profile = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(kernel_profile)

_HEADER = '"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"'


def _row(launch: int, name: str, metric: str, unit: str, value: str) -> str:
    return f'"{launch}","{name}(const float *)","{metric}","{unit}","{value}"'


def test_the_table_sums_durations_alone_when_the_csv_has_more_metrics(tmp_path):
    csv_path = tmp_path / "step.csv"
    csv_path.write_text("\n".join([
        "==PROF== a line ncu prints before its rows",
        _HEADER,
        _row(0, "qmv", "gpu__time_duration.sum", "us", "10.5"),
        _row(0, "qmv", "launch__grid_size", "", "1,536"),
        _row(1, "qmv", "gpu__time_duration.sum", "ns", "2,500"),
        _row(1, "qmv", "launch__grid_size", "", "416"),
        _row(2, "gather", "gpu__time_duration.sum", "us", "4"),
    ]))
    table = kernel_profile.kernel_table(csv_path)
    assert table.splitlines()[0] == "17.0 us over 3 kernels"
    assert "| 13.0 | 2 | 6.5 | `qmv` |" in table
    assert "| 4.0 | 1 | 4.0 | `gather` |" in table
