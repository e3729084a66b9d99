"""4. Snapshot: committing and restoring a large model through ``SnapshotStore`` on S3."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np

from flare_provider.snapshots import SnapshotStore
from flare_provider.snapshots.model_files import load_tensors, write_hashed

from .common import GIB, Section, gbps, median, ratio, size
from .large_model import model_layout

FEDERATION = "bench_snapshot"
# moto answers every ranged GET by reading the whole object, so boto3's default multipart
# (ranged) download is quadratic there, unlike on S3. Both sides therefore move the model
# in one request each way (S3 takes single PUTs up to 5 GiB).
SINGLE_REQUEST_BYTES = 5 * GIB
PLAIN_KEY = "plain/model.safetensors"


def run(work: Path, s3, nbytes: int, repeats: int, command: str) -> Section:
    section = Section(
        "4. Snapshot",
        command,
        intro=(
            f"A float32 model of {size(nbytes)} ({len(model_layout(nbytes))} tensors) committed as a round to "
            "moto's S3 server through `SnapshotStore` (from the weights in memory, as the engine commits) and "
            "restored (`latest()` + `load_weights()`, as a resumed run does), against boto3's own "
            "`upload_file` / `download_file` of the same safetensors file with the same client and transfer "
            f"settings, to the same server, in the same run. Median of {repeats} runs per figure. Both move the "
            "model in one request each way: moto serves every ranged GET by reading the whole object, which would "
            "make boto3's default multipart download quadratic here (it is not on S3)."
        ),
    )
    from boto3.s3.transfer import TransferConfig

    staging = work / "staging"
    staging.mkdir(parents=True)
    transfer = TransferConfig(multipart_threshold=SINGLE_REQUEST_BYTES)
    store = SnapshotStore(s3.uri("snapshots"), s3_settings=s3.settings, tmp_dir=staging, transfer_config=transfer)
    client = store.backend.client
    weights = {name: np.full(shape, 0.5, np.float32) for name, shape in model_layout(nbytes).items()}
    model_file = staging / "model.safetensors"
    commit, verify, load, local, upload, download, arrays = [], [], [], [], [], [], []

    def timed(into: list[float], call):
        started = time.perf_counter()
        result = call()
        into.append(time.perf_counter() - started)
        return result

    # Store and plain boto3 take turns, so that load from elsewhere falls on both alike.
    for _ in range(repeats):
        run_id = f"run-{uuid.uuid4().hex[:8]}"
        timed(commit, lambda: store.commit_round(FEDERATION, run_id, 1, weights, {"round": 1}))
        # What committing does before any byte goes to S3: serialize and hash, in one pass.
        timed(local, lambda: write_hashed(weights, model_file, "weights"))
        timed(upload, lambda: client.upload_file(str(model_file), s3.bucket, PLAIN_KEY, Config=transfer))
        downloaded = staging / "downloaded.safetensors"
        # The first large download after uploads runs about 1 s slower per 512 MiB here, whichever object it
        # reads; an untimed one takes that hit, so that it falls on neither side.
        client.download_file(s3.bucket, PLAIN_KEY, str(downloaded), Config=transfer)
        downloaded.unlink()
        snapshot = timed(verify, lambda: store.latest(FEDERATION, run_id))
        restored = timed(load, lambda: store.load_weights(snapshot))
        if snapshot.round != 1 or not all(np.array_equal(restored[k], weights[k]) for k in weights):
            raise RuntimeError("the committed round did not come back as it was committed")
        del restored
        timed(download, lambda: client.download_file(s3.bucket, PLAIN_KEY, str(downloaded), Config=transfer))
        # What load_weights does beyond a download: read the file into numpy arrays.
        timed(arrays, lambda: load_tensors(downloaded, str(downloaded)))
        downloaded.unlink()
        s3.empty_bucket()  # moto keeps objects in memory
    file_bytes = model_file.stat().st_size
    model_file.unlink()

    restore = [v + w for v, w in zip(verify, load, strict=True)]
    table = section.table(
        f"{size(nbytes)} model, moto S3 server on loopback",
        ["operation", "SnapshotStore (s)", "GB/s", "limit: plain boto3 (s)", "GB/s", "store time / limit"],
    )
    table.add("write (commit_round vs upload_file)", f"{median(commit):.2f}", gbps(nbytes / median(commit)),
              f"{median(upload):.2f}", gbps(nbytes / median(upload)), ratio(median(commit), median(upload)))
    table.add("restore (latest + load_weights vs download_file)", f"{median(restore):.2f}",
              gbps(nbytes / median(restore)), f"{median(download):.2f}", gbps(nbytes / median(download)),
              ratio(median(restore), median(download)))
    section.headline(f"snapshot write, {size(nbytes)} to S3", f"{median(commit):.2f} s",
                     f"{median(upload):.2f} s (boto3 upload_file)", ratio(median(commit), median(upload)))
    section.headline(f"snapshot restore, {size(nbytes)} from S3", f"{median(restore):.2f} s",
                     f"{median(download):.2f} s (boto3 download_file)", ratio(median(restore), median(download)))
    split = section.table("Where the time goes", ["step", "seconds"])
    split.add("commit: writing the safetensors file and hashing it, one pass (part of commit_round)",
              f"{median(local):.2f}")
    split.add("restore: `latest()`, which checks the state by checksum and the model by size and tag (no download)",
              f"{median(verify):.2f}")
    split.add("restore: `load_weights()`, which streams the model into its arrays, hashing it as it arrives",
              f"{median(load):.2f}")
    split.add("for comparison: loading a downloaded file into numpy arrays (after `download_file`)",
              f"{median(arrays):.2f}")
    split.notes.append(f"The model file is {file_bytes} bytes; GB/s are decimal gigabytes of model per second.")
    section.notes.append(
        "**Where the store differs from boto3.** A commit first writes the model to a staging file, hashing it on "
        "the way (first row above), then uploads it with its SHA-256 as object metadata, and makes three more "
        "requests (is the round committed already, the state, the commit marker). A restore downloads the model "
        "once: `latest()` -> `get_round()` reads the commit marker and the state and checks them by SHA-256, but "
        "checks the model only by a HEAD request (its size, and the SHA-256 in its metadata against the commit "
        "marker's); `load_weights()` then reads it with one GET straight into numpy arrays, hashing the bytes "
        "in a second thread as they arrive: no staging file, no second pass (the last row shows what loading a "
        "downloaded file would add)."
    )
    return section
