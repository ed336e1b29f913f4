"""The examples run as a user runs them, each in its own process, and do their job:
``train.py`` reaches its accuracy and labels its columns, ``data_parallel.py`` trains as one
device does (shard_map, pmap, across 2 jax.distributed processes, with groups of devices),
``resnet_from_torch.py`` trains in lockstep with PyTorch, ``accumulation.py`` gives the
running statistics of the whole batch, and ``fused.py`` trains fused as unfused; with few
epochs or steps for speed."""

import re
import time

import pytest

from helpers import run_example

# An epoch of train.py: epoch, train loss, test loss, test accuracy, recalibrated, time.
TRAIN_ROW = re.compile(r"^ *(\d+) +([\d.]+) +([\d.]+) +([\d.]+)% +([\d.]+)% +([\d.]+)$",
                       re.MULTILINE)


@pytest.fixture(scope="module")
def train():
    """``train.py``'s output, and the seconds it ran for, start to exit."""
    start = time.perf_counter()
    output = run_example("train.py")
    return output, time.perf_counter() - start


def test_train_reaches_95_percent_test_accuracy_with_and_without_recalibration(train):
    output, _ = train
    epochs = TRAIN_ROW.findall(output)
    assert len(epochs) == 15, output
    final = re.search(r"^final test accuracy: ([\d.]+)% \(with recalibrated running "
                      r"statistics: ([\d.]+)%", output, re.MULTILINE)
    assert final is not None, output
    assert float(final.group(1)) >= 95 and float(final.group(2)) >= 95, output


def test_train_labels_its_columns_and_times_each_epoch_in_seconds(train):
    output, seconds = train
    lines = output.splitlines()
    first = next((i for i, line in enumerate(lines) if TRAIN_ROW.fullmatch(line)), 0)
    assert first > 0, output  # a header line above the first epoch
    header = re.split(r"\s{2,}", lines[first - 1].strip())
    assert len(header) == len(TRAIN_ROW.fullmatch(lines[first]).groups()), output
    time_column = header[-1]
    assert "epoch" in time_column and "(s)" in time_column, output
    # Per epoch, not elapsed: the epochs' times add up to no more than the whole run's,
    # where elapsed times would add up to several times it.
    times = [float(row[-1]) for row in TRAIN_ROW.findall(output)]
    assert 0 < sum(times) <= seconds, (seconds, output)


@pytest.mark.parametrize("args", [
    ("--epochs", "1"),
    ("--epochs", "1", "--processes", "2", "--group-size", "4"),
    ("--epochs", "1", "--processes", "2", "--pmap", "--group-size", "2"),
], ids=["shard_map", "shard_map-2-processes-groups-of-4", "pmap-2-processes-groups-of-2"])
def test_data_parallel_training_matches_one_device(args):
    output = run_example("data_parallel.py", *args)
    epochs = int(args[1])
    devices = re.search(r"over (\d+) cpu devices in (\d+) process", output)
    assert devices is not None, output
    assert devices.groups() == ("8", "2" if "--processes" in args else "1"), output
    if "--group-size" in args:
        assert f"per group of {args[args.index('--group-size') + 1]} devices" in output, output
    # epoch, then train loss, test loss and accuracy (1 device, parallel), differences.
    rows = re.findall(r"^(\d+) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+)% +([\d.]+)%"
                      r" +([\d.e+-]+) +([\d.e+-]+)$", output, re.MULTILINE)
    assert [int(row[0]) for row in rows] == list(range(1, epochs + 1)), output
    for row in rows:
        single_accuracy, parallel_accuracy = row[5], row[6]
        assert single_accuracy == parallel_accuracy, output
    assert "MISMATCH" not in output
    assert re.search(r"^match: ", output, re.MULTILINE), output


def test_resnet_example_trains_in_lockstep_with_pytorch_and_loads_back_strictly(monkeypatch):
    # One torch thread: the tiny model gains nothing from more, and idle OpenMP threads
    # spinning between torch calls would slow JAX's.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    output = run_example("resnet_from_torch.py", "--width", "4", "--blocks", "1", "--size",
                         "16", "--batch", "4", "--steps", "2")
    assert re.search(r"12 batch norms .* among 74 state_dict entries", output), output
    rows = re.findall(r"^ +(\d+) +\| +([\d.]+) +([\d.e+-]+) +([\d.e+-]+) +([\d.e+-]+) +\| +"
                      r"([\d.e+-]+) +\| +([\d.e+-]+)$", output, re.MULTILINE)
    assert [int(row[0]) for row in rows] == [1, 2], output
    for row in rows:
        assert max(float(value) for value in row[2:5]) <= 1e-9, output
    logits = re.findall(r"max \|PyTorch − JAX\| = ([\d.e+-]+)", output)
    assert len(logits) == 2 and max(map(float, logits)) <= 1e-9, output
    assert "strict=True: 74 entries, missing [], unexpected []" in output, output


def test_accumulation_gives_the_first_layer_the_statistics_of_the_whole_batch():
    output = run_example("accumulation.py", "--epochs", "1")
    found = dict(re.findall(r"first layer after one optimizer step, (.*?): max \|running − one "
                            r"call on the whole batch\| = ([\d.e+-]+)", output))
    assert float(found["accumulation_steps"]) <= 1e-6, output
    assert float(found["per call"]) >= 1e-2, output
    assert "num_batches_tracked 1" in output and "num_batches_tracked 4" in output, output
    accuracies = re.findall(r"test accuracy in eval mode, .*: ([\d.]+)%", output)
    assert len(accuracies) == 2 and all(float(a) >= 80 for a in accuracies), output


def test_fused_trains_as_unfused_and_reports_the_memory_of_each():
    output = run_example("fused.py", "--epochs", "2")
    rows = re.findall(r"^ *(\d+) +([\d.]+) +([\d.]+) +([\d.]+)% +([\d.]+)% +([\d.]+)$", output,
                      re.MULTILINE)
    assert len(rows) == 2, output
    for _, fused_loss, unfused_loss, fused_accuracy, unfused_accuracy, _ in rows:
        assert abs(float(fused_loss) - float(unfused_loss)) <= 1e-3 * float(unfused_loss)
        assert fused_accuracy == unfused_accuracy, output
    difference = re.search(r"between the loss curves: ([\d.e+-]+)", output)
    assert difference is not None and float(difference.group(1)) <= 1e-3, output
    kept = re.search(r"^kept for the backward pass: fused ([\d.]+) MiB, unfused ([\d.]+) MiB",
                     output, re.MULTILINE)
    assert kept is not None and float(kept.group(1)) < float(kept.group(2)), output
    assert re.search(r"^peak temporary memory of the step on this machine: fused [\d.]+ MiB, "
                     r"unfused [\d.]+ MiB", output, re.MULTILINE), output
