"""The benchmark harness runs end to end on a tiny shape, so that it cannot rot."""

import math
import os
import subprocess
import sys
from pathlib import Path

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
    assert len(tables) == 4  # training, eval, edges, fused
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
    header, _, *rows = tables[3]  # fused: within 5e-5 where the bias is ≤ 100 × the weight
    assert [float(row[0]) for row in rows] == list(accuracy.BIAS_RATIOS)
    for row in rows:
        if float(row[0]) <= 100:
            assert all(float(cell) <= 5e-5 for cell in row[1:]), row
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


ROOT = Path(__file__).resolve().parent.parent
# The benchmarks' commands run as users run them: a fresh process, float32 by default, one
# CPU device (the suite's processes have x64 on and 8 virtual devices).
COMMAND_ENVIRONMENT = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
                       "JAX_ENABLE_X64": "0"}
SMALL_MODEL = ["--blocks", "1", "1", "1", "1", "--batch", "2", "--size", "32",
               "--cpu-batch", "2", "--cpu-size", "32", "--budget", "0"]


def run_command(*argv: str) -> str:
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                          check=True, env=COMMAND_ENVIRONMENT, cwd=ROOT, timeout=600).stdout


def test_the_whole_model_benchmark_times_every_variant_and_writes_nothing_by_default():
    from benchmarks import model

    before = model.MODEL.stat().st_mtime_ns if model.MODEL.exists() else None
    output = run_command("benchmarks.model", "--parts", "cpu", *SMALL_MODEL)
    tables = markdown_tables(output)
    figures = {row[0]: row[1:] for table in tables[1:] for row in table[2:]}
    header = tables[1][0]
    assert header[1:-1] == list(model.VARIANTS), header  # every variant ran
    assert len(tables) == 1 + len(model.DTYPES)  # the targets, then a table per dtype
    for measure in ("CPU step (ms)", "CPU compile (s)", "CPU peak temporaries (MiB)"):
        assert all(float(cell) > 0 for cell in figures[measure][:-1]), (measure, output)
    assert (model.MODEL.stat().st_mtime_ns if model.MODEL.exists() else None) == before


def test_the_control_of_the_whole_model_has_no_batch_norm_and_the_others_one_per_conv():
    import jax

    from benchmarks import model

    blocks = (1, 1, 1, 1)
    convolutions = len(model.layers(blocks))
    for variant in model.VARIANTS:
        params, states = jax.eval_shape(
            lambda variant=variant: model.init(model.VARIANTS[variant][1](), blocks,
                                               jax.random.key(0)))
        with_norm = [name for name, layer in params.items()
                     if name != "classifier" and jax.tree.leaves(layer["norm"])]
        assert len(with_norm) == (0 if variant == model.CONTROL else convolutions), variant


@pytest.mark.parametrize("part", ["gpu", "tpu"])
def test_the_whole_model_plans_compile_for_an_h100_and_a_tpu_without_either(part):
    from benchmarks import plans

    if plans.missing(part):
        pytest.skip(plans.missing(part))
    output = run_command("benchmarks.model", "--parts", part, "--dtypes", "float32",
                         *SMALL_MODEL)
    [_, table] = markdown_tables(output)
    figures = {row[0]: row[1:-1] for row in table[2:]}
    name = {"gpu": "H100 memory traffic (GiB)", "tpu": "TPU v5e bytes accessed (GiB)"}[part]
    assert all(float(cell) > 0 for cell in figures[name]), output
    if part == "gpu":
        assert figures["H100 conditionals"] == ["0"] * len(figures[name]), output


def test_the_gpu_run_refuses_without_a_gpu_and_runs_where_asked_to():
    failed = subprocess.run([sys.executable, "-m", "benchmarks.gpu_run"], capture_output=True,
                            text=True, env=COMMAND_ENVIRONMENT, cwd=ROOT, timeout=600)
    assert failed.returncode != 0 and "times a GPU" in failed.stderr
    output = run_command("benchmarks.gpu_run", "--any-device", "--shapes", "8x4", "--blocks",
                         "1", "1", "1", "1", "--batch", "2", "--size", "32", "--budget", "0")
    layer, whole = markdown_tables(output)
    assert {(row[0], row[2]) for row in layer[2:]} == {("8×4", "jbn"), ("8×4", "flax")}
    assert [row[1] for row in whole[2:]] == ["jbn", "flax", "none"] * 2


def test_the_costs_of_the_pieces_compile_on_the_installed_plans():
    from benchmarks import plans

    if plans.missing("gpu") and plans.missing("tpu"):
        pytest.skip(plans.missing("gpu"))
    from benchmarks import costs

    before = costs.COSTS.stat().st_mtime_ns if costs.COSTS.exists() else None
    [table] = markdown_tables(run_command("benchmarks.costs"))
    assert [row[0] for row in table[2:]] == list(costs.CASES)
    figures = {row[0]: row[1:] for row in table[2:]}
    if not plans.missing("tpu"):  # a shift from x keeps the sums out of the conv's epilogue
        assert float(figures["sums about one value of x"][2]) > float(
            figures["sums about a given K"][2])
    if not plans.missing("gpu"):  # the step counter is a kernel of its own
        assert int(figures["per-channel update and a step counter"][0]) == int(
            figures["per-channel update"][0]) + 1
    assert (costs.COSTS.stat().st_mtime_ns if costs.COSTS.exists() else None) == before


def test_the_memory_benchmark_compares_fused_unfused_flax_and_none_and_writes_nothing():
    from benchmarks import memory

    before = memory.MEMORY.stat().st_mtime_ns if memory.MEMORY.exists() else None
    output = run_command("benchmarks.memory", "--parts", "cpu", "--dtypes", "float32",
                         "--blocks", "1", "1", "1", "1", "--cpu-batch", "2", "--cpu-size", "32",
                         "--budget", "0")
    targets, table = markdown_tables(output)
    assert table[0][1:-1] == list(memory.VARIANTS)
    figures = {row[0]: row[1:-1] for row in table[2:]}
    for measure in ("CPU peak temporaries (MiB)", "CPU step (ms)"):
        assert all(float(cell) > 0 for cell in figures[measure]), output
    assert [row[0] for row in targets[2:]] == [
        "CPU peak temporaries, float32: jbn fused ÷ flax (reported)",
        "CPU step, float32: jbn fused ÷ jbn ≤ 1.1"]
    assert (memory.MEMORY.stat().st_mtime_ns if memory.MEMORY.exists() else None) == before
