"""6. Through a relay: what sites that dial out cost, against the same sites reached directly.

The same federation is provisioned twice in one run, once with sites that listen on a
loopback port (the Airflow side dials them) and once with sites that dial out to one
relay process (the Airflow side reaches them through it, with the end-to-end mutual TLS
inside). Round overhead uses the plus-one app of section 1; the wire figures are one
upload and one download of a large model to and from one site, each alone, as in
section 2. The relay's peak memory is its process's VmHWM after it carried one model of
``--relay-memory-mib`` (1 GiB) up and down, each in one transfer: it holds bounded
buffers, so the figure must not grow with the model.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from flare_provider.snapshots import SnapshotStore
from flare_provider.wire.tensors import save_file

from .common import GIB, MIB, Section, gbps, local_federation, median, ms, ratio, size
from .large_model import single_transfers
from .overhead import APP, run_rounds

OVERHEAD_LIMIT = 1.3  # a round through the relay at most 1.3x the direct round
WIRE_TARGET = 0.7  # wire throughput through the relay at least 0.7x direct
RELAY_MEMORY_LIMIT = 200 * MIB
MODES = ("listen", "outbound")


def _overhead(work: Path, mode: str, num_sites: int, rounds: int) -> float:
    """Median seconds of a plus-one round (training time taken out) with ``num_sites`` sites."""
    with local_federation(work / f"{mode}-{num_sites}", f"bench_relay_{mode}", num_sites, connect=mode,
                          preload_modules=[]) as fed:
        fed.deploy_app(APP)
        initial = _initial(work)
        store = SnapshotStore((work / f"snapshots-{mode}-{num_sites}").as_uri())
        times = run_rounds(fed, fed.sites, rounds, store, initial)
    return median(t.total - t.training for t in times)


def _wire(work: Path, mode: str, nbytes: int, memory_bytes: int) -> tuple[float, float, int | None]:
    """(upload B/s, download B/s, relay peak RSS) of one large model to and from one site.

    Through the relay, a model of ``memory_bytes`` then goes up and down once more, each
    in one transfer, before the relay's peak memory is read."""
    with local_federation(work / f"wire-{mode}", f"bench_wire_{mode}", 1, connect=mode, preload_modules=[]) as fed:
        fed.deploy_app(APP)
        up, down = single_transfers(fed, work / "probe.safetensors", nbytes)
        peak = None
        if mode == "outbound":
            single_transfers(fed, work / "probe.safetensors", memory_bytes, repeats=1)
            peak = _peak_rss(fed.relay().pid)
    return up, down, peak


def _many_sites(work: Path, mode: str, num_sites: int, rounds: int) -> tuple[float, float]:
    """(seconds until all sites answered, median round overhead) with ``num_sites`` sites
    reached directly (``listen``) or attached to one relay (``outbound``)."""
    started = time.perf_counter()
    with local_federation(work / f"many-{mode}-{num_sites}", f"bench_many_{mode}", num_sites, connect=mode,
                          preload_modules=[]) as fed:
        attached = time.perf_counter() - started
        fed.deploy_app(APP)
        initial = _initial(work)
        store = SnapshotStore((work / f"snapshots-many-{mode}-{num_sites}").as_uri())
        times = run_rounds(fed, fed.sites, rounds, store, initial)
    return attached, median(t.total - t.training for t in times)


def _initial(work: Path) -> Path:
    """The plus-one app's four-float model, zeros."""
    path = work / "initial.safetensors"
    save_file({"w": np.zeros(4, np.float32)}, path)
    return path


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def run(
    work: Path, site_counts: list[int], rounds: int, wire_bytes: int, memory_bytes: int, many_sites: int, command: str
) -> Section:
    section = Section(
        "6. Through a relay",
        command,
        intro=(
            "The same local federation twice in one run: sites listening on loopback ports (direct), and sites "
            "dialling out to one relay process (the production topology: no port open at the sites, the Airflow "
            "side's mutual TLS with each agent carried through the relay). Agents with `preload_modules: []` "
            "(the plus-one app imports numpy only)."
        ),
    )
    table = section.table("Round overhead (plus-one app, training time taken out)",
                          ["sites", "direct (ms)", "through the relay (ms)", "relay / direct", f"limit {OVERHEAD_LIMIT}x"])
    for num_sites in site_counts:
        direct = _overhead(work, "listen", num_sites, rounds)
        relayed = _overhead(work, "outbound", num_sites, rounds)
        table.add(num_sites, ms(direct), ms(relayed), ratio(relayed, direct),
                  "met" if relayed <= OVERHEAD_LIMIT * direct else "missed")
        section.headline(f"round overhead through a relay, {num_sites} sites", f"{ms(relayed)} ms", f"{ms(direct)} ms direct",
                         ratio(relayed, direct))

    up, down, _ = _wire(work, "listen", wire_bytes, memory_bytes)
    r_up, r_down, peak = _wire(work, "outbound", wire_bytes, memory_bytes)
    table = section.table(f"Wire: one {size(wire_bytes)} upload and download, each alone",
                          ["", "direct GB/s", "through the relay GB/s", "relay / direct", f"target {WIRE_TARGET}x"])
    for name, direct, relayed in (("upload", up, r_up), ("download", down, r_down)):
        table.add(name, gbps(direct), gbps(relayed), ratio(relayed, direct),
                  "met" if relayed >= WIRE_TARGET * direct else "missed")
    wire, r_wire = (up + down) / 2, (r_up + r_down) / 2
    section.headline("wire throughput through a relay", f"{gbps(r_wire)} GB/s", f"{gbps(wire)} GB/s direct (target 0.7x)",
                     ratio(r_wire, wire))
    largest = f"{size(memory_bytes)} up, then down, each in one transfer"
    table = section.table("Relay memory", ["carried", "relay peak RSS", f"limit {size(RELAY_MEMORY_LIMIT)}"])
    table.add(largest, f"{peak / MIB:.1f} MiB", "met" if peak < RELAY_MEMORY_LIMIT else "missed")
    section.headline(f"relay peak memory carrying {size(memory_bytes)} each way", f"{peak / MIB:.1f} MiB",
                     size(RELAY_MEMORY_LIMIT), ratio(peak, RELAY_MEMORY_LIMIT))

    direct_start, direct = _many_sites(work, "listen", many_sites, rounds)
    attached, relayed = _many_sites(work, "outbound", many_sites, rounds)
    table = section.table(f"{many_sites} sites attached to one relay",
                          ["sites", "start-up until all answered: direct", "through the relay",
                           "round overhead (median, ms): direct", "through the relay", "relay / direct"])
    table.add(many_sites, f"{direct_start:.1f} s", f"{attached:.1f} s", ms(direct), ms(relayed), ratio(relayed, direct))
    section.notes.append(
        f"Sizes: {rounds} rounds per row; wire figures are medians of three transfers of {size(wire_bytes)} "
        f"({wire_bytes / GIB:.2f} GiB); the relay's peak memory was read after it had carried those and then "
        f"{size(memory_bytes)} each way."
    )
    return section

