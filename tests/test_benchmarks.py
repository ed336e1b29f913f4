"""The benchmark harness runs end to end on a tiny shape, so that it cannot rot."""

import math

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
        for peer in [*installed, harness.EXACT]:
            row = report.row((8, 4), mode, peer)
            assert row is not None, (mode, peer)
            assert len(row.seconds) >= 3
            assert all(math.isfinite(s) and s > 0 for s in row.seconds), (mode, peer)
            if mode == "grad" and peer != harness.EXACT:
                assert row.agrees, f"{peer} does not compute what jbn computes"
    floor = report.floors[(8, 4)]
    assert all(math.isfinite(s) and s > 0 for s in floor.seconds)
    table = capsys.readouterr().out
    for peer in [*installed, harness.EXACT]:
        assert f"| 8×4 | {peer} |" in table
    targets = [target for target, _, _ in harness.targets(report, [(8, 4)])]
    assert any("exact path" in target for target in targets), targets
    assert (results.stat().st_mtime_ns if results.exists() else None) == before


def test_peers_that_are_not_installed_are_reported_as_skipped(monkeypatch):
    peers = {"jbn": PEERS["jbn"], "missing": ("a_module_that_is_not_installed", PEERS["jbn"][1])}
    monkeypatch.setattr(harness, "PEERS", peers)

    report = harness.run([(8, 4)], reps=1, budget=0, compile_reps=1)

    assert "missing" in report.skipped
    assert report.row((8, 4), "train", "missing") is None
    assert "## Skipped peers" in harness.markdown(report)


def test_accuracy_tables_print_a_row_per_ratio_with_jbn_within_1e_5(capsys):
    from benchmarks import accuracy

    accuracy.main()
    tables = [[]]
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("|"):
            tables[-1].append(line)
        elif tables[-1]:
            tables.append([])
    tables = [table for table in tables if table]
    assert len(tables) == 2  # training, eval
    for lines in tables:
        header = [cell.strip() for cell in lines[0].strip("|").split("|")]
        assert header[:2] == ["r", "jbn"]
        rows = lines[2:]
        assert len(rows) == len(accuracy.RATIOS)
        for row in rows:
            errors = dict(zip(header, row.strip("|").split("|"), strict=True))
            jbn_columns = [name for name in header if name.startswith("jbn")
                           and name != "jbn folded"]
            assert all(float(errors[name]) <= 1e-5 for name in jbn_columns), row


def test_branch_cost_compares_jbn_with_and_without_its_branch(capsys):
    from benchmarks import branch

    branch.main(["--shapes", "8x4", "--reps", "2", "--compile-reps", "1"])

    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 8×4 |")]
    assert len(rows) == 1, rows
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert all(float(cell.split()[0]) > 0 for cell in cells[1:]), cells
