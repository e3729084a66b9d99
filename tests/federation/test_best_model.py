"""Best-model selection and early stopping with real agents: rounds made worse for real (a
learning rate that blows up from round 3, through the run's round configs), the best round
kept in the snapshot store, the run stopped after N rounds without improvement, and a
later run warm-started from the best round."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from flare_provider.federation.selection import BestRound, SelectionRule
from flare_provider.snapshots import SnapshotStore

APP = Path(__file__).resolve().parents[2] / "examples" / "apps" / "digits"

BEST_DAG = """
import pendulum
from airflow.sdk import DAG
from flare_provider.operators import ScatterGatherOperator

with DAG("{dag_id}", schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False) as dag:
    ScatterGatherOperator(task_id="train", app_name="digits", flare_conn_id="{conn}", federation="{federation}",
                          snapshot_uri="file://{snapshots}", wait_time_after_min_received=0, {args})
"""


def test_rule_scores_rounds_and_stops_after_n_without_improvement():
    rule = SelectionRule("loss", "min", early_stop_rounds=2)
    best = BestRound.start(rule)
    assert best.observe(rule, 1, {"loss": 0.9}) and best.observe(rule, 2, {"loss": 0.5})
    assert not best.observe(rule, 3, {"loss": 0.7}) and not best.stopped_early
    assert not best.observe(rule, 4, {}) and best.stopped_early  # a round nobody could evaluate is no improvement
    assert (best.round, best.value, best.rounds_without_improvement) == (2, 0.5, 2)
    # The standing travels in committed state and comes back the same; another metric starts afresh.
    assert BestRound.from_state(rule, best.to_dict()) == best
    assert BestRound.from_state(SelectionRule("accuracy"), best.to_dict()) == BestRound.start(SelectionRule("accuracy"))


def test_bad_selection_arguments_are_refused_clearly():
    from flare_provider.operators import ScatterGatherOperator

    with pytest.raises(ValueError, match="early_stop_rounds needs best_metric"):
        SelectionRule(None, early_stop_rounds=3)
    with pytest.raises(ValueError, match="best_mode must be one of max, min, got 'up'"):
        SelectionRule("accuracy", "up")
    with pytest.raises(ValueError, match="early_stop_rounds needs best_metric.*output_model='best' needs best_metric"):
        ScatterGatherOperator(task_id="t", app_name="digits", early_stop_rounds=2, output_model="best")
    with pytest.raises(ValueError, match="warm_start must be one of last, best, got 'first'"):
        ScatterGatherOperator(task_id="t", app_name="digits", initial_model="previous", warm_start="first")


@pytest.fixture(scope="module")
def fed(digits_federation):
    digits_federation.deploy_app(APP)
    return digits_federation


@pytest.fixture(scope="module")
def federation_runs(tmp_path_factory):
    return {"federation": f"best_{uuid.uuid4().hex[:6]}", "snapshots": tmp_path_factory.mktemp("best") / "snapshots"}


@pytest.fixture(scope="module")
def degrading_run(run_dag, xcom, fed, federation_runs):
    """Six rounds asked for; from round 3 the sites train with lr=2.0, which wrecks the model."""
    dag_id = f"best_{uuid.uuid4().hex[:6]}"
    args = ('num_rounds=6, best_metric="accuracy", best_mode="max", early_stop_rounds=2, output_model="best", '
            'round_configs={3: {"lr": 2.0}, 4: {"lr": 2.0}, 5: {"lr": 2.0}, 6: {"lr": 2.0}}')
    source = BEST_DAG.format(dag_id=dag_id, conn=fed.conn_id, args=args, **federation_runs)
    dag_run = run_dag(source, dag_id)
    assert dag_run.state == "success"
    return dag_run, xcom(dag_run, "train")


def test_best_round_is_kept_when_later_rounds_are_worse_and_the_run_stops_early(degrading_run, federation_runs):
    dag_run, result = degrading_run
    store = SnapshotStore(f"file://{federation_runs['snapshots']}")
    federation = federation_runs["federation"]
    # Rounds 3 and 4 did not beat round 2: with early_stop_rounds=2 the run ends after round 4, not 6.
    assert (result["rounds_done"], result["stopped_early"]) == (4, True)
    assert store.list_rounds(federation, dag_run.run_id) == [0, 1, 2, 3, 4]
    last = store.latest(federation, dag_run.run_id)
    scores = [h["evaluation"]["accuracy"] for h in last.state["history"]]
    print("global model accuracy by round (the sites' evaluation):", scores)
    assert scores[1] > scores[0] and max(scores[2:]) < scores[1] - 0.2, scores
    # The best round is named in the committed state (it survives a resume) and is round 2's own commit.
    assert last.state["best"] == {"metric": "accuracy", "mode": "max", "round": 2, "value": scores[1],
                                  "rounds_without_improvement": 2, "stopped_early": True}
    best_uri = store.get_round(federation, dag_run.run_id, 2).uri
    assert result["best"] == {"round": 2, "metric": "accuracy", "mode": "max", "value": scores[1],
                              "snapshot_uri": best_uri, "model_uri": f"{best_uri}/model.safetensors"}
    assert result["last"]["round"] == 4 and result["last"]["snapshot_uri"] == last.uri
    # output_model="best": the XCom's model, and the final evaluation, are round 2's.
    assert (result["output_model"], result["model_uri"]) == ("best", f"{best_uri}/model.safetensors")
    assert result["evaluation"]["global"]["accuracy"] == pytest.approx(scores[1])
    assert store.find_final(federation, dag_run.run_id).round == 4  # the run's end is still its last round


def test_warm_start_from_the_best_round(run_dag, fed, degrading_run, federation_runs):
    first_run, _ = degrading_run
    store = SnapshotStore(f"file://{federation_runs['snapshots']}")
    federation = federation_runs["federation"]
    dag_id = f"best_warm_{uuid.uuid4().hex[:6]}"
    args = 'num_rounds=1, initial_model="previous", warm_start="best", evaluate=False'
    dag_run = run_dag(BEST_DAG.format(dag_id=dag_id, conn=fed.conn_id, args=args, **federation_runs), dag_id)
    assert dag_run.state == "success"
    start = store.load_weights(store.get_round(federation, dag_run.run_id, 0))
    best = store.load_weights(store.get_round(federation, first_run.run_id, 2))
    last = store.load_weights(store.get_round(federation, first_run.run_id, 4))
    assert all(np.array_equal(start[k], best[k]) for k in best)
    assert not all(np.array_equal(start[k], last[k]) for k in last)
