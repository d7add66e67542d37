"""scripts/bench_train.py: its smoke run (``--quick`` on the CPU) finishes, checks the FFT grid
against the dense one, and ends with the hybrids' training throughput relative to the baseline."""

from __future__ import annotations

import re

from conftest import run_cli

LAST_LINE = re.compile(r"^training images/s vs cnn_baseline: grid \d+\.\d\dx, keypoints \d+\.\d\dx, knn \d+\.\d\dx$")
ERROR_COLUMN = "fft vs dense error"


def table_after(lines: list[str], column: str) -> tuple[list[str], list[list[str]]]:
    """``(header cells, rows of cells)`` of the markdown table whose header has ``column``."""
    start = next(i for i, line in enumerate(lines) if line.startswith("|") and column in line)

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    rows = []
    for line in lines[start + 2 :]:  # (after the header and its |---| line)
        if not line.startswith("|"):
            break
        rows.append(cells(line))
    return cells(lines[start]), rows


def test_quick_run():
    proc = run_cli("scripts/bench_train.py", "--quick", "--device", "cpu", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.rstrip("\n").splitlines()
    assert LAST_LINE.match(lines[-1]), lines[-1]

    header, rows = table_after(lines, ERROR_COLUMN)
    col = header.index(ERROR_COLUMN)
    assert {(row[0], row[2]) for row in rows} == {
        (f"{s}×{s}", edges) for s in (8, 16) for edges in ("gaussian", "inverse_distance")
    }, rows
    for row in rows:
        assert float(row[col]) < 1e-4, row

    header, rows = table_after(lines, "training (images/s)")
    assert [row[0] for row in rows] == ["cnn_baseline", "mnist_grid", "mnist_keypoints", "mnist_knn"]
