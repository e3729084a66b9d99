"""``ScatterGatherOperator``: federated training rounds as one Airflow task.

Each round scatters the global model to the sites, waits for their training (in the
worker, or in the triggerer with ``deferrable=True``), aggregates the updates and commits
a snapshot. A retry of the task resumes after the last committed round and re-attaches
to the sites' tasks of a round that was in flight; nothing is trained twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from flare_provider.aggregation.names import BUILTIN_AGGREGATORS
from flare_provider.assets import declare_model_outlet, record_model
from flare_provider.federation.data_check import check_problems
from flare_provider.operators.arguments import is_template, rendered_mapping, run_problems, selection_problems
from flare_provider.operators.deferral import defer_step, taken_up

if TYPE_CHECKING:
    from airflow.sdk import Asset

    from flare_provider.federation.records import Progress
    from flare_provider.federation.scatter_gather import ScatterGatherRun


class ScatterGatherOperator(BaseOperator):
    """Train ``app_name`` across the sites for ``num_rounds`` rounds.

    :param app_name: the deployed app the sites train with (see ``DeployAppOperator``).
    :param num_rounds: rounds to run.
    :param min_clients: results needed for a round (default: every site).
    :param sites: site names (default: every site of the connection).
    :param wait_time_after_min_received: seconds to wait for stragglers once
        ``min_clients`` results are in.
    :param train_timeout: seconds a round may wait at most; late sites are dropped.
    :param aggregator: ``fedavg``, ``fedprox``, ``fedadam``, ``fedyogi``, ``fedadagrad``,
        ``median``, ``trimmed_mean`` or a class path; ``aggregator_args`` its parameters.
    :param central_dp: central differential privacy of the aggregate (a mean-based
        aggregator): ``{"clip": 1.0, "noise_multiplier": 1.0, "delta": 1e-5}``, optionally
        ``"adaptive": {"target_quantile", "learning_rate", "count_noise_std"}``; each round
        records the epsilon spent (see ``docs/privacy.md``; needs the ``privacy`` extra).
    :param initial_model: a safetensors file or ``s3://`` / ``file://`` URI; ``"previous"``
        for the final model of the latest finished run of this federation (warm start);
        None to let a site build the app's initial model.
    :param snapshot_uri: ``s3://bucket/prefix`` or ``file:///path`` (default
        ``$FLARE_SNAPSHOT_URI`` or ``file://$AIRFLOW_HOME/flare-snapshots``).
    :param aws_conn_id: an Airflow AWS connection for ``s3://`` (else the standard AWS chain).
    :param federation: the name runs are filed under (default: the DAG id).
    :param train_config: config every trainer gets each round (lr, epochs, ...);
        ``round_configs`` maps a round number to overrides for that round.
    :param num_gpus: GPUs per site task (default: 1 where a site has GPUs). More than one:
        the task runs as that many ranks of PyTorch distributed, one GPU each (NCCL).
    :param num_processes: ranks per site task where it runs on CPU (a site without GPUs, or
        ``num_gpus=0``), with gloo; from 1 to the site's cores (default 1). See
        ``docs/apps.md``, "Several GPUs or processes at a site".
    :param snapshot_every: commit every N rounds (the last round always); must be 1 when
        deferrable, since the snapshot carries the run from one deferral to the next.
    :param evaluate: after the last round, every site evaluates the final model.
    :param deferrable: wait for the sites in the triggerer, freeing the worker slot.
    :param poll_interval: seconds between two status polls of the sites by the trigger
        (deferrable mode; the worker follows the sites' streams instead).
    :param connect_grace: seconds a site may be unreachable when a round's task is sent to
        it (an agent restarting, a network blip) before it is dropped from that round.
    :param flare_conn_id: the federation's ``flare`` connection (the server kit).
    :param mlflow_conn_id: an ``mlflow`` connection (a tracking server): the DAG run becomes an
        MLflow run with a child run per site, its metrics and the final model (``docs/tracking.md``).
    :param check_data: before the first round, every site summarizes its data (the trainer's
        ``describe``) and the run stops, nothing trained, naming the sites that fail
        ``{"schema": "equal", "min_samples": 100}`` (optional ``"timeout"`` in seconds);
        checked once per run (see ``docs/apps.md``).
    :param best_metric: keep the round whose global model scores best on this metric of
        the sites' evaluation (``accuracy``, ``loss`` for the built-in trainer; weighted by
        the sites' sample counts): after each round every site evaluates the new global
        model. None (the default) evaluates only after the last round and keeps no best.
    :param best_mode: ``"max"`` (higher is better) or ``"min"``.
    :param early_stop_rounds: stop after this many rounds in a row without a new best.
    :param warm_start: with ``initial_model="previous"``: start from the earlier run's
        ``"last"`` round or its ``"best"`` one.
    :param output_model: ``"last"`` or ``"best"``: the model ``model_uri`` names and the
        final evaluation scores (both are returned under ``last`` and ``best``).
    :param model_asset: the Asset of the global model, the task's outlet: each finished run
        emits an event with its run, round, digest and metrics (default:
        ``flare_provider.assets.model_asset(federation, snapshot_uri)``; docs/assets.md).

    Returns (to XCom): the snapshot URI, rounds done and the final metrics, the last and
    the best round. Never weights.
    """

    template_fields: Sequence[str] = (
        "app_name",
        "num_rounds",
        "min_clients",
        "sites",
        "wait_time_after_min_received",
        "train_timeout",
        "aggregator",
        "aggregator_args",
        "initial_model",
        "snapshot_uri",
        "federation",
        "train_config",
        "round_configs",
        "num_gpus",
        "num_processes",
        "best_metric",
        "early_stop_rounds",
    )
    template_fields_renderers = {"train_config": "json", "aggregator_args": "json", "round_configs": "json"}
    ui_color = "#cfe8ff"

    def __init__(
        self,
        *,
        app_name: str,
        num_rounds: int | str = 5,
        min_clients: int | str | None = None,
        sites: Sequence[str] | None = None,
        wait_time_after_min_received: float | str = 10.0,
        train_timeout: float | str = 3600.0,
        aggregator: str = "fedavg",
        aggregator_args: Mapping[str, Any] | None = None,
        central_dp: Mapping[str, Any] | None = None,
        initial_model: str | None = None,
        snapshot_uri: str | None = None,
        aws_conn_id: str | None = None,
        federation: str | None = None,
        train_config: Mapping[str, Any] | None = None,
        round_configs: Mapping[int, Mapping[str, Any]] | None = None,
        num_gpus: int | None = None,
        num_processes: int | None = None,
        snapshot_every: int = 1,
        evaluate: bool = True,
        deferrable: bool = False,
        poll_interval: float = 2.0,
        connect_grace: float = 10.0,
        flare_conn_id: str = "flare_default",
        mlflow_conn_id: str | None = None,
        check_data: Mapping[str, Any] | None = None,
        best_metric: str | None = None,
        best_mode: str = "max",
        early_stop_rounds: int | str | None = None,
        warm_start: str = "last",
        output_model: str = "last",
        model_asset: "Asset | None" = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.app_name = app_name
        self.num_rounds = num_rounds
        self.min_clients = min_clients
        self.sites = list(sites) if sites is not None and not isinstance(sites, str) else sites
        self.wait_time_after_min_received = wait_time_after_min_received
        self.train_timeout = train_timeout
        self.aggregator = aggregator
        # JSON fields given as a template stay text until rendered (see rendered_mapping)
        self.aggregator_args = aggregator_args if is_template(aggregator_args) else dict(aggregator_args or {})
        self.central_dp = dict(central_dp or {})
        self.initial_model = initial_model
        self.snapshot_uri = snapshot_uri
        self.aws_conn_id = aws_conn_id
        self.federation = federation
        self.train_config = train_config if is_template(train_config) else dict(train_config or {})
        self.round_configs = round_configs if is_template(round_configs) else dict(round_configs or {})
        self.num_gpus = num_gpus
        self.num_processes = num_processes
        self.snapshot_every = snapshot_every
        self.evaluate = evaluate
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.connect_grace = connect_grace
        self.flare_conn_id = flare_conn_id
        self.mlflow_conn_id = mlflow_conn_id
        self.check_data = dict(check_data or {})
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.early_stop_rounds = early_stop_rounds
        self.warm_start = warm_start
        self.output_model = output_model
        self._run: ScatterGatherRun | None = None
        self._check_arguments()
        # the global model as an outlet Asset (docs/assets.md); None where it cannot be named yet
        self.model_asset = declare_model_outlet(self, model_asset)

    def _check_arguments(self) -> None:
        """Catch what is wrong at DAG parse time, without importing anything heavy."""
        problems = []
        for name in ("num_rounds", "min_clients"):
            value = getattr(self, name)
            if value is not None and not is_template(value) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                problems.append(f"{name} must be a positive integer, got {value!r}")
        for name in ("wait_time_after_min_received", "train_timeout"):
            value = getattr(self, name)
            if not is_template(value) and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                problems.append(f"{name} must be a non-negative number of seconds, got {value!r}")
        if (
            isinstance(self.aggregator, str)
            and not is_template(self.aggregator)
            and self.aggregator not in BUILTIN_AGGREGATORS
            and "." not in self.aggregator
        ):
            problems.append(f"unknown aggregator {self.aggregator!r}; choose one of {', '.join(BUILTIN_AGGREGATORS)} or a class path")
        problems += run_problems(self)
        problems += check_problems(self.check_data)
        if (
            isinstance(self.sites, list)
            and isinstance(self.min_clients, int)
            and self.min_clients > len(self.sites)
        ):
            problems.append(f"min_clients ({self.min_clients}) is more than the {len(self.sites)} sites given")
        if not isinstance(self.snapshot_every, int) or self.snapshot_every < 1:
            problems.append(f"snapshot_every must be a positive integer, got {self.snapshot_every!r}")
        elif self.deferrable and self.snapshot_every != 1:
            # Between deferrals the run lives only in the snapshot store.
            problems.append(f"snapshot_every must be 1 with deferrable=True (every round is committed), got {self.snapshot_every}")
        if self.central_dp:
            from flare_provider.privacy.central import CentralDPSettings  # no numpy, no accountant

            try:
                CentralDPSettings.from_dict(self.central_dp)
            except ValueError as exc:
                problems.append(str(exc))
        problems += selection_problems(self)
        if problems:
            raise ValueError(f"{type(self).__name__} {self.task_id!r}: " + "; ".join(problems))

    # ---- building the run -------------------------------------------------------------

    def _build_run(self, context: Any) -> "ScatterGatherRun":
        from flare_provider.aggregation import AggregatorConfigError
        from flare_provider.federation.records import RunSpec
        from flare_provider.federation.scatter_gather import ScatterGatherRun
        from flare_provider.federation.selection import SelectionRule
        from flare_provider.hooks.flare import FlareConnectionError, FlareHook
        from flare_provider.hooks.snapshots import SnapshotStoreHook
        from flare_provider.tracking.hook import mlflow_settings

        try:
            kit = FlareHook(self.flare_conn_id).get_kit()
            sites = tuple(self.sites or sorted(kit.sites))
            spec = RunSpec(
                federation=self.federation or self.dag_id,
                run_id=context["run_id"],
                app_name=self.app_name,
                sites=sites,
                num_rounds=int(self.num_rounds),
                min_clients=int(self.min_clients) if self.min_clients is not None else len(sites),
                wait_time_after_min_received=float(self.wait_time_after_min_received),
                train_timeout=float(self.train_timeout),
                aggregator=self.aggregator,
                aggregator_args=rendered_mapping(self.aggregator_args, "aggregator_args"),
                central_dp=self.central_dp,
                train_config=rendered_mapping(self.train_config, "train_config"),
                round_configs={int(k): v for k, v in rendered_mapping(self.round_configs, "round_configs").items()},
                num_gpus=self.num_gpus,
                num_processes=None if self.num_processes is None else int(self.num_processes),
                snapshot_every=self.snapshot_every,
                connect_grace=float(self.connect_grace),
                status_poll_interval=float(self.poll_interval),
            )
            selection = SelectionRule(
                self.best_metric or None,
                self.best_mode,
                int(self.early_stop_rounds) if self.early_stop_rounds not in (None, "") else None,
            )
            self._run = ScatterGatherRun(
                spec,
                kit,
                SnapshotStoreHook(self.snapshot_uri, self.aws_conn_id).get_store(),
                initial_model=self.initial_model,
                logger=self.log,
                extra_state={"airflow": {"dag_id": self.dag_id, "task_id": self.task_id, "run_id": context["run_id"]}},
                warm_start=self.warm_start,
                selection=selection,
                mlflow=mlflow_settings(self.mlflow_conn_id),  # docs/tracking.md
            )
        except (ValueError, AggregatorConfigError, FlareConnectionError) as exc:
            # Wrong arguments or connection: a retry cannot fix it, and no site was contacted.
            raise AirflowFailException(str(exc)) from exc
        return self._run

    # ---- execution --------------------------------------------------------------------

    def _check_site_data(self, run: Any) -> None:
        """``check_data``: every site's data summary, once per run, before anything trains."""
        from flare_provider.federation.data_check import DataCheckFailed, ensure_data_checked

        try:
            ensure_data_checked(run, self.check_data, self.log)
        except DataCheckFailed as exc:
            raise AirflowFailException(str(exc)) from exc

    def execute(self, context: Any) -> dict[str, Any]:
        with self._build_run(context) as run:
            self._check_site_data(run)
            progress = run.restore()
            if self.deferrable:
                return self._next_round_or_finish(run, progress)
            return self._finish(run, run.run_rounds(progress))

    def execute_complete(self, context: Any, event: dict[str, Any], flight: dict[str, Any] | None = None) -> dict[str, Any]:
        """Back from the trigger: finish the round it watched, then defer for the next one or finish."""
        with self._build_run(context) as run:
            return self._next_round_or_finish(run, run.resume_round(taken_up(flight, event), event))

    def _next_round_or_finish(self, run: "ScatterGatherRun", progress: "Progress") -> dict[str, Any]:
        """Deferrable mode: scatter the next round and hand the waiting to the triggerer."""
        if run.finished(progress):
            return self._finish(run, progress)
        flight = run.scatter(progress)
        run.in_flight = None  # the trigger watches it now; this process lets go
        defer_step(self, self.flare_conn_id, flight, run.rule(flight).to_dict(), run.spec.status_poll_interval)

    def _finish(self, run: "ScatterGatherRun", progress: "Progress") -> dict[str, Any]:
        spec = run.spec
        uri = run.finalize(progress)
        last = {"round": progress.round, "snapshot_uri": uri, "model_uri": f"{uri}/model.safetensors"}
        best = None
        if run.best.round is not None:
            best_uri = run.checkpoints.round_uri(run.best.round)
            best = {"round": run.best.round, "metric": run.best.metric, "mode": run.best.mode, "value": run.best.value,
                    "snapshot_uri": best_uri, "model_uri": f"{best_uri}/model.safetensors"}
        elif self.output_model == "best":
            self.log.warning("No round was scored on %s; the output model is the last round's", self.best_metric)
        outlet = best if self.output_model == "best" and best is not None else last
        result: dict[str, Any] = {
            "federation": spec.federation,
            "run_id": spec.run_id,
            "rounds_done": progress.round,
            "stopped_early": run.best.stopped_early,
            "output_model": "best" if outlet is best else "last",
            "snapshot_uri": outlet["snapshot_uri"],
            "model_uri": outlet["model_uri"],
            "final_metrics": progress.metrics,
            "last": last,
            "best": best,
        }
        if run.best.stopped_early:
            self.log.info("Stopped early after round %d: %d rounds without a better %s than round %s",
                          progress.round, run.best.rounds_without_improvement, run.best.metric, run.best.round)
        if self.evaluate:
            evaluation = run.evaluate(run.best_model() if outlet is best else progress)
            result["evaluation"] = evaluation
            self.log.info("Final evaluation: global %s; per site %s", evaluation["global"],
                          {s: r.get("metrics", r.get("error")) for s, r in evaluation["sites"].items()})
        record_model(self, run, result)
        self.log.info("Federation %s finished %d rounds; model at %s", spec.federation, progress.round, result["model_uri"])
        return result

    def get_openlineage_facets_on_start(self) -> Any:
        from flare_provider.lineage import facets_on_start

        return facets_on_start(self)

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        from flare_provider.lineage import facets_on_complete

        return facets_on_complete(self)

    def on_kill(self) -> None:
        """Marked failed or cleared in the UI: stop the sites' trainings of the round in flight."""
        if self._run is not None:
            self._run.abort()

