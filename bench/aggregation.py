"""3. Aggregation: FedAvg over sites' updates in files on disk, as the engine feeds them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from flare_provider.aggregation import make_aggregator
from flare_provider.aggregation.validation import validate_update
from flare_provider.wire.finite_scan import FiniteScan

from . import limits
from .common import GIB, Section, gbps, median, ratio, size
from .large_model import model_layout

ORDERS = {
    "in turn": lambda sites: sites,  # each update folds in as it arrives
    "reversed": lambda sites: sites[::-1],  # all but the last wait on disk first (spilled copies)
}


def write_updates(folder: Path, num_updates: int, nbytes: int) -> tuple[dict[str, np.ndarray], dict[str, Path]]:
    """The global model and ``num_updates`` sites' full weights of it, as safetensors files."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    global_weights = {name: rng.standard_normal(shape, np.float32) for name, shape in model_layout(nbytes).items()}
    files = {}
    for i in range(num_updates):
        site = f"site-{i + 1:02d}"
        files[site] = folder / f"{site}.safetensors"
        save_file({k: v + np.float32(0.01 * (i + 1)) for k, v in global_weights.items()}, str(files[site]))
    return global_weights, files


def counted_on_arrival(files: dict[str, Path]) -> tuple[dict[str, dict[str, int]], float]:
    """Each update's non-finite values, counted as the engine counts them while downloading
    (a FiniteScan fed the file's 1 MiB chunks in order), and the seconds the counting took."""
    counts, seconds = {}, 0.0
    for site, path in files.items():
        with open(path, "rb") as f:
            chunks = list(iter(lambda: f.read(1 << 20), b""))
        scan = FiniteScan()
        started = time.perf_counter()
        scan.start(sum(len(c) for c in chunks))
        for chunk in chunks:
            scan.feed(chunk)
        seconds += time.perf_counter() - started
        counts[site] = scan.counts()
    return counts, seconds


def one_round(global_weights, files: dict[str, Path], order, spill: Path, *, move: bool = True,
              counts: dict[str, dict[str, int]] | None = None) -> float:
    """Seconds from the first update handed to FedAvg to the new global model.

    ``move``: each update is handed over as the engine hands over its downloads
    (``add(..., move=True)``), as a fresh link to the benchmark's file so that the file
    stays for the next round; without it the aggregator must not keep the caller's file.
    ``counts``: each update's non-finite values, as the engine hands them over (counted
    while it downloaded the update); without them each file is read to count them.
    """
    sites = sorted(files)
    handed = spill / "handed"
    handed.mkdir(parents=True, exist_ok=True)
    with make_aggregator("fedavg", spill_dir=spill) as aggregator:
        aggregator.begin_round(global_weights, 1, sites)
        started = time.perf_counter()
        for number, site in enumerate(order(sites), 1):
            path = files[site]
            if move:
                path = handed / path.name
                os.link(files[site], path)
            aggregator.add(site, path, 100 * number, move=move, nonfinite=(counts or {}).get(site))
            if move:
                path.unlink(missing_ok=True)  # what the engine does with a file it handed over
        new = aggregator.finish()
        seconds = time.perf_counter() - started
    if set(new) != set(global_weights):
        raise RuntimeError("FedAvg returned another model")
    return seconds


def run(work: Path, num_updates: int, nbytes: int, repeats: int, command: str) -> Section:
    section = Section(
        "3. Aggregation",
        command,
        intro=(
            f"FedAvg (`make_aggregator('fedavg')`) over {num_updates} updates of {size(nbytes)} each (float32, "
            f"{len(model_layout(nbytes))} tensors), full weights in safetensors files on local disk, handed to "
            "`add()` one by one as the engine does, with the counts of non-finite values the engine takes while it "
            "downloads each update; the files are in the page cache (written just before). "
            f"Median of {repeats} rounds per row."
        ),
    )
    folder = work / "updates"
    folder.mkdir(parents=True)
    global_weights, files = write_updates(folder, num_updates, nbytes)
    counts, scanning = counted_on_arrival(files)
    total = num_updates * nbytes
    copy = limits.memory_copy(min(GIB, total))
    table = section.table(
        "FedAvg throughput",
        ["arrival order", "updates", "seconds", "GB/s (update bytes / second)", "limit: numpy copy GB/s",
         "throughput / limit"],
    )
    seconds_by_order = {}
    for label, order in ORDERS.items():
        seconds = seconds_by_order[label] = median(
            one_round(global_weights, files, order, work / "spill", counts=counts) for _ in range(repeats))
        section.headline(f"FedAvg, {num_updates} x {size(nbytes)}, updates {label}", f"{gbps(total / seconds)} GB/s",
                         f"{gbps(copy)} GB/s (numpy copy)", ratio(total / seconds, copy))
        table.add(label, f"{num_updates} x {size(nbytes)}", f"{seconds:.2f}", gbps(total / seconds), gbps(copy),
                  ratio(total / seconds, copy))
    # The same without the counts: what a caller that downloads updates itself pays.
    uncounted = median(one_round(global_weights, files, ORDERS["in turn"], work / "spill") for _ in range(repeats))
    table.add("in turn, no counts given (each file read to count)", f"{num_updates} x {size(nbytes)}",
              f"{uncounted:.2f}", gbps(total / uncounted), gbps(copy), ratio(total / uncounted, copy))
    table.notes.append(
        "*in turn*: the updates arrive in the fold order (sorted site names); *reversed*: every update but the "
        "last arrives before its turn. Either way each is checked when it arrives and summed at the end. The limit is "
        f"numpy copying a {size(min(GIB, total))} array into another one in memory (median of 5), measured in the "
        "same run. The last row hands no counts over, as `add()` called on files the caller did not download "
        "through the engine: the aggregator then reads each update once more to count its NaN and infinite values."
    )
    # Where the time goes: the checking pass alone, on the same files.
    checking = median(_validate_all(global_weights, files, counts) for _ in range(repeats))
    split = section.table("Where the time goes (in turn)", ["step", "seconds", "share of the round"])
    in_turn = seconds_by_order["in turn"]
    split.add("checking every update (names, shapes, dtypes; the counts of non-finite values)", f"{checking:.2f}",
              f"{checking / in_turn:.0%}")
    split.add("summing all updates into the new model (one pass, every core)", f"{in_turn - checking:.2f}",
              f"{(in_turn - checking) / in_turn:.0%}")
    split.add("not in the round: counting non-finite values as the updates arrived (one core, 1 MiB chunks)",
              f"{scanning:.2f}", f"{gbps(total / scanning)} GB/s")
    split.notes.append(
        "**Where FedAvg's time goes.** Each update is read once from the page cache, at the end, when one pass "
        "sums all of them. A bad update must still be refused before it counts: its names, shapes and dtypes are "
        "checked from its header when it arrives, and its NaN and infinite values were counted while it was "
        "downloaded (`flare_provider/wire/finite_scan.py`, on the download's write-behind thread, each 1 MiB chunk "
        "while it is in the CPU's cache; the last row of the table measures that counting on its own, on chunks "
        "read back from the files). The sum (`flare_provider/aggregation/kernel.py`): each block of the model is "
        "a float64 total in the CPU's "
        "cache to which every update adds `n * values` in the fixed site order, then it is divided and stored in "
        "the model's dtype, so no float64 sums of the whole model are written or read back. An update waits on "
        "disk until then: handed over (`add(..., move=True)`, as the engine does and as this benchmark does, with "
        "a link to its file) it is renamed or linked, never copied. Per element the sum costs a read from the page "
        "cache, a conversion to float64, a multiplication and an addition; numpy makes each a pass of its own over "
        "the block, which is what keeps it below the speed of a copy."
    )
    for path in files.values():
        path.unlink()
    return section


def _validate_all(global_weights, files: dict[str, Path], counts: dict[str, dict[str, int]]) -> float:
    started = time.perf_counter()
    for site, path in files.items():
        validate_update(global_weights, path, site=site, nonfinite=counts[site])
    return time.perf_counter() - started
