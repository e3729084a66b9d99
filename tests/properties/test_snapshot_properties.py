"""A snapshot store's ``COMMIT``, ``state.json`` and ``FINAL`` files, as a retried task restores from them.

Whatever those files hold, ``latest``, ``restore`` and ``find_final`` give a round that
verifies, skip a damaged one in favour of the round before (never returning it), or raise
:class:`SnapshotError`; reading changes nothing in the store.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from hostile_support import PATH_TRICKS, broken_bytes, examples, hostile_values, json_safe
from hypothesis import example, given
from hypothesis import strategies as st

from flare_provider.snapshots import SnapshotStore
from flare_provider.snapshots.errors import SnapshotError

WEIGHTS = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
FED, RUN = "fed", "run-1"


class Store:
    """A file store with rounds 1 and 2 committed and round 2 marked final."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="snapshot-prop-"))
        self.store = SnapshotStore(self.root.as_uri())
        for number in (1, 2):
            self.store.commit_round(FED, RUN, number, WEIGHTS, {"round": number, "history": []})
        self.store.mark_final(FED, RUN, 2)
        self.round2 = next(self.root.rglob("round_00002"))
        self.final = self.round2.parent / "FINAL"

    def files(self) -> dict[str, bytes]:
        return {p.relative_to(self.root).as_posix(): p.read_bytes() for p in sorted(self.root.rglob("*")) if p.is_file()}

    def check(self) -> None:
        """Every reading gives round 2 (if it still verifies), round 1, or a SnapshotError; nothing changes."""
        before = self.files()
        try:
            latest = self.store.latest(FED, RUN)
            assert latest is not None and latest.round in (1, 2) and isinstance(latest.state, dict)
            restored = self.store.restore(FED, RUN)
            assert restored is not None and restored[0].round in (1, 2)
            np.testing.assert_array_equal(restored[1]["w"], WEIGHTS["w"])
            try:
                final = self.store.find_final(FED, RUN)
                assert final is None or final.round in (1, 2)
            except SnapshotError:
                pass
            final = self.store.find_final(FED)  # a warm start: a damaged final model is skipped
            assert final is None or final.round in (1, 2)
        except SnapshotError as exc:
            assert "file://" in str(exc) or str(self.root) in str(exc), exc
        assert self.files() == before, "reading the store changed it"

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def with_store(change) -> None:
    store = Store()
    try:
        change(store)
        store.check()
    finally:
        store.close()


def rewrite_state(store: Store, raw: bytes) -> None:
    """A new state.json whose digest the COMMIT records, as a writer with access to the store could do."""
    (store.round2 / "state.json").write_bytes(raw)
    commit = json.loads((store.round2 / "COMMIT").read_text())
    commit["files"]["state.json"] = {"sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}
    (store.round2 / "COMMIT").write_text(json.dumps(commit))


COMMIT_PATHS = [("format",), ("files",), ("committed_at",), ("files", "model.safetensors"),
                ("files", "model.safetensors", "sha256"), ("files", "model.safetensors", "size"),
                ("files", "model.safetensors", "tag"), ("files", "state.json", "size")]
file_names = st.one_of(st.sampled_from(PATH_TRICKS + ["../round_00001/model.safetensors", "/dev/zero", "COMMIT"]),
                       st.text(max_size=12))


@examples(80)
@given(path=st.sampled_from(COMMIT_PATHS), value=hostile_values().map(json_safe))
def test_a_commit_with_a_hostile_field(path, value):
    def change(store: Store) -> None:
        commit = json.loads((store.round2 / "COMMIT").read_text())
        target = commit
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        (store.round2 / "COMMIT").write_text(json.dumps(commit))

    with_store(change)


@examples(60)
@given(name=file_names, size=st.sampled_from([0, 6, 10**20]))
@example(name="../../../../../../../../dev/zero", size=0).via("was an endless read of /dev/zero")
@example(name="a\x00b", size=0).via("was ValueError: embedded null byte")
def test_a_commit_listing_a_file_of_another_name(name, size):
    def change(store: Store) -> None:
        commit = json.loads((store.round2 / "COMMIT").read_text())
        commit["files"][name] = {"sha256": "0" * 64, "size": size}
        (store.round2 / "COMMIT").write_text(json.dumps(commit))

    with_store(change)


@examples(60)
@given(raw=broken_bytes)
def test_broken_commit_bytes(raw):
    with_store(lambda store: (store.round2 / "COMMIT").write_bytes(raw))


@examples(60)
@given(doc=hostile_values(max_leaves=10).map(json_safe))
@example(doc=[1, 2]).via("a state that is no mapping (was returned)")
def test_a_committed_state_of_any_json(doc):
    with_store(lambda store: rewrite_state(store, json.dumps(doc).encode()))


@examples(40)
@given(raw=broken_bytes)
def test_a_committed_state_of_broken_bytes(raw):
    with_store(lambda store: rewrite_state(store, raw))


@examples(60)
@given(doc=st.one_of(hostile_values(max_leaves=8).map(json_safe),
                     st.fixed_dictionaries({"round": hostile_values(), "marked_at": hostile_values()}).map(json_safe)))
@example(doc={"round": 7}).via("a final round that was never committed")
def test_a_final_marker_of_any_json(doc):
    with_store(lambda store: store.final.write_text(json.dumps(doc)))


@examples(40)
@given(raw=broken_bytes)
def test_a_final_marker_of_broken_bytes(raw):
    with_store(lambda store: store.final.write_bytes(raw))
