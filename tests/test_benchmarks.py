"""The benchmark harness runs end to end on a tiny shape, so that it cannot rot."""

import math

import numpy as np
import pytest

from benchmarks import __main__ as command
from benchmarks import harness
from benchmarks.peers import PEERS


def test_harness_times_every_installed_peer_in_both_modes_and_writes_nothing_by_default(
        capsys):
    results = command.RESULTS
    before = results.stat().st_mtime_ns if results.exists() else None

    report = command.main(["--shapes", "8x4", "--reps", "3", "--budget", "0",
                           "--compile-reps", "1"])

    installed = [name for name in PEERS if name not in report.skipped]
    assert installed[0] == "jbn"
    for mode in harness.MODES:
        for peer in [*installed, harness.EXACT, harness.other_path(), harness.ACCUMULATING]:
            row = report.row((8, 4), mode, peer)
            assert row is not None, (mode, peer)
            assert len(row.seconds) >= 3
            assert all(math.isfinite(s) and s > 0 for s in row.seconds), (mode, peer)
            if mode == "grad" and peer != harness.EXACT:
                assert row.agrees, f"{peer} does not compute what jbn computes"
    floor = report.floors[(8, 4)]
    assert all(math.isfinite(s) and s > 0 for s in floor.seconds)
    table = capsys.readouterr().out
    for peer in [*installed, harness.EXACT, harness.other_path(), harness.ACCUMULATING]:
        assert f"| 8×4 | {peer} |" in table
    targets = [target for target, _, _ in harness.targets(report, [(8, 4)])]
    assert any("channel 0 at 10σ" in target for target in targets), targets
    assert any(harness.other_path()[5:] in target for target in targets), targets
    assert any("accumulating" in target for target in targets), targets
    assert (results.stat().st_mtime_ns if results.exists() else None) == before


def test_peers_that_are_not_installed_are_reported_as_skipped(monkeypatch):
    peers = {"jbn": PEERS["jbn"], "missing": ("a_module_that_is_not_installed", PEERS["jbn"][1])}
    monkeypatch.setattr(harness, "PEERS", peers)

    report = harness.run([(8, 4)], reps=1, budget=0, compile_reps=1)

    assert "missing" in report.skipped
    assert report.row((8, 4), "train", "missing") is None
    assert "## Skipped peers" in harness.markdown(report)


def markdown_tables(text: str) -> list[list[list[str]]]:
    """The tables of a Markdown text, each a list of rows of cells (header and rule too)."""
    tables = [[]]
    for line in text.splitlines():
        if line.startswith("|"):
            tables[-1].append(line)
        elif tables[-1]:
            tables.append([])
    return [[[cell.strip() for cell in line.strip("|").split("|")] for line in table]
            for table in tables if table]


def test_accuracy_tables_show_jbn_within_its_promise_but_in_the_documented_worst_case(capsys):
    from benchmarks import accuracy

    recorded = accuracy.ACCURACY
    before = recorded.stat().st_mtime_ns if recorded.exists() else None
    accuracy.main()
    tables = markdown_tables(capsys.readouterr().out)
    assert len(tables) == 3  # training, eval, edges
    # What the docs include, benchmarks/ACCURACY.md, has the tables of this run (its columns
    # and rows, the figures of its own run), and a run without --write changed no file.
    assert [[row[0] for row in table] + table[0] for table in markdown_tables(
        recorded.read_text())] == [[row[0] for row in table] + table[0] for table in tables]
    assert (recorded.stat().st_mtime_ns if recorded.exists() else None) == before
    for header, _, *rows in tables[:2]:
        assert header[:2] == ["r", "jbn"] or header[:2] == ["r", "jbn, cpu"]
        assert len(rows) == len(accuracy.RATIOS)
        jbn_columns = [i for i, name in enumerate(header)
                       if name.startswith("jbn") and name != "jbn folded"]
        assert all(float(row[i]) <= 1e-5 for row in rows for i in jbn_columns), rows
    header, _, *rows = tables[2]
    assert len(rows) == len(accuracy.edge_cases(np.random.default_rng(0)))
    for row in rows:
        ratios = {name: float(cell.split("(")[1].rstrip(")"))
                  for name, cell in zip(header[1:], row[1:], strict=True)}
        if row[0].startswith("all") and "+10σ" in row[0]:  # the accelerators' worst case
            assert ratios.pop("jbn, accelerator") > 1, row
        assert all(ratio <= 1 for ratio in ratios.values()), row


def test_running_statistics_table_shows_float32_following_float64_and_half_precision_not(
        capsys):
    from benchmarks import running_stats

    recorded = running_stats.RUNNING_STATS
    before = recorded.stat().st_mtime_ns if recorded.exists() else None
    running_stats.main()
    [table] = markdown_tables(capsys.readouterr().out)
    assert [row[:2] for row in table] == [row[:2] for row in markdown_tables(
        recorded.read_text())[0]]  # the docs include the rows of this run
    assert (recorded.stat().st_mtime_ns if recorded.exists() else None) == before
    header, _, *rows = table
    errors = {tuple(row[:2]): [float(cell.split(" (")[0]) for cell in row[2:]] for row in rows}
    assert errors[("float32", "jbn.batchnorm")] == [
        pytest.approx(0, abs=1e-5)] * len(running_stats.COLUMNS)
    for (dtype, _), columns in errors.items():
        if dtype in ("bfloat16", "float16"):  # stops short, where the noise is small
            assert columns[0] > 1e-2, (dtype, columns)
