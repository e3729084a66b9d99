"""The simulator gives the very model a real federation gives: same app, seeds, data and rounds.

The real run is three agents behind a relay (mutual TLS, signed app bundle, worker
processes), driven by the run engine as an Airflow task drives it. The simulated run is
the same engine with three simulated sites on local folders. Both start from the model the
app builds from its seed at site-1, train on the same non-IID digits split, and FedAvg
folds the updates in sorted site order whatever order they arrive in; PyTorch runs
deterministic algorithms on CPU with the same number of threads per worker (the agents'
default of two CPU slots, the simulator's ``threads=2``). So every tensor must be equal
bit for bit, not merely close.
"""

from __future__ import annotations

import numpy as np
from sim_support import DIGITS_APP, ONE_EPOCH

from flare_provider.client import load_caller_kit
from flare_provider.federation.records import RunSpec
from flare_provider.federation.scatter_gather import ScatterGatherRun
from flare_provider.simulator.options import SimulationOptions, plan
from flare_provider.simulator.run import simulate
from flare_provider.snapshots import SnapshotStore

FEDERATION, RUN_ID, ROUNDS = "digits-equivalence", "same-seeds", 2


def committed(store: SnapshotStore, round_number: int) -> dict[str, np.ndarray]:
    return store.load_weights(store.get_round(FEDERATION, RUN_ID, round_number))


def test_the_simulator_gives_the_model_of_a_real_run_bit_for_bit(real_federation, tmp_path):
    fed = real_federation
    version = fed.deploy_app(DIGITS_APP)
    real_store = SnapshotStore((tmp_path / "real").as_uri())
    spec = RunSpec(federation=FEDERATION, run_id=RUN_ID, app_name="digits", sites=fed.sites, num_rounds=ROUNDS,
                   min_clients=len(fed.sites), train_config=ONE_EPOCH, app_version=version)
    with ScatterGatherRun(spec, load_caller_kit(fed.server_kit), real_store) as run:
        real = run.run()

    simulation = plan(SimulationOptions(app_dir=DIGITS_APP, workspace=tmp_path / "sim", num_rounds=ROUNDS, num_sites=3,
                                        threads=2, gpus=(), train_config=ONE_EPOCH, federation=FEDERATION, run_id=RUN_ID))
    result = simulate(simulation)
    sim_store = SnapshotStore(simulation.snapshot_uri)

    # The same sites, each with byte-for-byte the same data as the real site's.
    assert simulation.sites == fed.sites
    for site in fed.sites:
        for name in ("train.npz", "test.npz"):
            assert (simulation.data_dirs[site] / name).read_bytes() == (fed.data_dir(site) / name).read_bytes()
    # The same app: the simulator runs the files the signed bundle carries, under the same version.
    assert simulation.app_version == version

    assert result.rounds_done == real.round == ROUNDS
    for number in range(ROUNDS + 1):  # round 0 is the initial model, built from the app's seed
        real_model, sim_model = committed(real_store, number), committed(sim_store, number)
        assert sorted(sim_model) == sorted(real_model)
        for name in real_model:
            assert sim_model[name].dtype == real_model[name].dtype, name
            assert np.array_equal(sim_model[name], real_model[name]), f"round {number}: {name} differs"
    assert not np.array_equal(committed(sim_store, ROUNDS)["0.weight"], committed(sim_store, 0)["0.weight"])  # it trained

    # The same records: who took part with how many samples, and the same metrics to the last bit.
    for real_round, sim_round in zip(real.history, result.history, strict=True):
        assert sim_round.accepted == real_round.accepted == list(fed.sites)
        assert {s: r.num_samples for s, r in sim_round.sites.items()} == {s: r.num_samples for s, r in real_round.sites.items()}
        assert sim_round.metrics == real_round.metrics
        assert {s: r.metrics for s, r in sim_round.sites.items()} == {s: r.metrics for s, r in real_round.sites.items()}
