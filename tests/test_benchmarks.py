"""The benchmark harness runs end to end on a tiny shape, so that it cannot rot."""

import math

from benchmarks import __main__ as command
from benchmarks import harness
from benchmarks.peers import PEERS


def test_harness_times_every_installed_peer_in_both_modes_without_writing(capsys):
    results = command.RESULTS
    before = results.stat().st_mtime_ns if results.exists() else None

    report = command.main(["--shapes", "8x4", "--reps", "3", "--budget", "0", "--no-write"])

    installed = [name for name in PEERS if name not in report.skipped]
    assert installed[0] == "jbn"
    for mode in harness.MODES:
        for peer in installed:
            row = report.row((8, 4), mode, peer)
            assert row is not None, (mode, peer)
            assert len(row.seconds) >= 3
            assert all(math.isfinite(s) and s > 0 for s in row.seconds), (mode, peer)
            if mode == "grad":
                assert row.agrees, f"{peer} does not compute what jbn computes"
    floor = report.floors[(8, 4)]
    assert all(math.isfinite(s) and s > 0 for s in floor.seconds)
    table = capsys.readouterr().out
    for peer in installed:
        assert f"| 8×4 | {peer} |" in table
    assert (results.stat().st_mtime_ns if results.exists() else None) == before


def test_peers_that_are_not_installed_are_reported_as_skipped(monkeypatch):
    peers = {"jbn": PEERS["jbn"], "missing": ("a_module_that_is_not_installed", PEERS["jbn"][1])}
    monkeypatch.setattr(harness, "PEERS", peers)

    report = harness.run([(8, 4)], reps=1, budget=0)

    assert "missing" in report.skipped
    assert report.row((8, 4), "train", "missing") is None
    assert "## Skipped peers" in harness.markdown(report)


def test_accuracy_table_prints_a_row_per_ratio_with_jbn_within_1e_5(capsys):
    from benchmarks import accuracy

    accuracy.main()
    lines = capsys.readouterr().out.strip().splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:2] == ["r", "jbn"]
    rows = lines[2:]
    assert len(rows) == len(accuracy.RATIOS)
    for row in rows:
        assert float(row.strip("|").split("|")[1]) <= 1e-5
