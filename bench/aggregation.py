"""3. Aggregation: FedAvg over sites' updates in files on disk, as the engine feeds them."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from flare_provider.aggregation import make_aggregator
from flare_provider.aggregation.validation import validate_update

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


def one_round(global_weights, files: dict[str, Path], order, spill: Path) -> float:
    """Seconds from the first update handed to FedAvg to the new global model."""
    sites = sorted(files)
    with make_aggregator("fedavg", spill_dir=spill) as aggregator:
        aggregator.begin_round(global_weights, 1, sites)
        started = time.perf_counter()
        for number, site in enumerate(order(sites), 1):
            aggregator.add(site, files[site], 100 * number)
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
            "`add()` one by one as the engine does; the files are in the page cache (written just before). "
            f"Median of {repeats} rounds per row."
        ),
    )
    folder = work / "updates"
    folder.mkdir(parents=True)
    global_weights, files = write_updates(folder, num_updates, nbytes)
    total = num_updates * nbytes
    copy = limits.memory_copy(min(GIB, total))
    table = section.table(
        "FedAvg throughput",
        ["arrival order", "updates", "seconds", "GB/s (update bytes / second)", "limit: numpy copy GB/s",
         "throughput / limit"],
    )
    seconds_by_order = {}
    for label, order in ORDERS.items():
        seconds = seconds_by_order[label] = median(one_round(global_weights, files, order, work / "spill") for _ in range(repeats))
        section.headline(f"FedAvg, {num_updates} x {size(nbytes)}, updates {label}", f"{gbps(total / seconds)} GB/s",
                         f"{gbps(copy)} GB/s (numpy copy)", ratio(total / seconds, copy))
        table.add(label, f"{num_updates} x {size(nbytes)}", f"{seconds:.2f}", gbps(total / seconds), gbps(copy),
                  ratio(total / seconds, copy))
    table.notes.append(
        "*in turn*: the updates arrive in the fold order (sorted site names) and each is folded in at once; "
        "*reversed*: every update but the last arrives before its turn and waits in a copy on disk. The limit is "
        f"numpy copying a {size(min(GIB, total))} array into another one in memory (median of 5), measured in the "
        "same run."
    )
    # Where the time goes: the checking pass alone, on the same files.
    checking = median(_validate_all(global_weights, files) for _ in range(repeats))
    split = section.table("Where the time goes (in turn)", ["step", "seconds", "share of the round"])
    in_turn = seconds_by_order["in turn"]
    split.add("checking every update (names, shapes, dtypes, finite values)", f"{checking:.2f}",
              f"{checking / in_turn:.0%}")
    split.add("folding in (float64 sums) and the final average", f"{in_turn - checking:.2f}",
              f"{(in_turn - checking) / in_turn:.0%}")
    split.notes.append(
        "**Why FedAvg runs below memory speed.** Each update is read twice from the page cache: once to check it "
        "(`validate_update`, block by block into one small buffer, `np.isfinite`), because a bad update must not "
        "touch the sums, and once to fold it in (`WeightedMeanAggregator._fold`: blocks read into a reused buffer, "
        "`sum += n * values` in place through a float64 scratch block, no allocation per tensor). The float64 sums "
        "are what bounds the fold: per byte of a float32 update it reads two bytes of sums and writes two, where "
        "the copy limit reads one byte and writes one. An update that waits for its turn is copied on disk first "
        "(`Aggregator._spill`); the engine hands its files over (`add(..., move=True)`) and they are renamed "
        "instead, but this benchmark keeps its files, so *reversed* pays for the copies."
    )
    for path in files.values():
        path.unlink()
    return section


def _validate_all(global_weights, files: dict[str, Path]) -> float:
    started = time.perf_counter()
    for site, path in files.items():
        validate_update(global_weights, path, site=site)
    return time.perf_counter() - started
