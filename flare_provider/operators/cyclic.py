"""``CyclicOperator``: cyclic weight transfer as one Airflow task.

The model travels from site to site, each training on the last one's output, for
``num_rounds`` rounds (every site once per round). Every hop is committed to the snapshot
store; a retry resumes at the hop it was on and re-attaches to that site's task. With
``deferrable=True`` each hop's wait runs in the triggerer (the round trigger, with a rule
that needs the one site), the worker slot free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from flare_provider.assets import declare_model_outlet, record_model
from flare_provider.federation.cyclic_plan import ON_FAILURE, ORDERS
from flare_provider.federation.data_check import check_problems
from flare_provider.operators.arguments import is_template, rendered_mapping, run_problems, selection_problems
from flare_provider.operators.deferral import defer_step, taken_up

if TYPE_CHECKING:
    from airflow.sdk import Asset

    from flare_provider.federation.cyclic import CyclicRun
    from flare_provider.federation.records import Progress


class CyclicOperator(BaseOperator):
    """Train ``app_name`` by passing the model from site to site for ``num_rounds`` rounds.

    :param app_name: the deployed app the sites train with (see ``DeployAppOperator``).
    :param num_rounds: rounds; in each, every site trains the model once.
    :param sites: site names, in the ``fixed`` order (default: every site of the connection, sorted).
    :param order: ``fixed``, ``random`` (a new order each round) or ``random_no_repeat``
        (random, never the same site twice in a row across a round's end).
    :param seed: with the run id, makes the random orders (a retry computes the same ones).
    :param on_failure: ``stop`` fails the task at a failing site; ``skip`` logs the reason
        and passes the model on unchanged to the next site.
    :param train_timeout: seconds one site may take for its hop.
    :param initial_model: a safetensors file or ``s3://`` / ``file://`` URI; ``"previous"``
        for the final model of the latest finished run of this federation (warm start);
        None to let a site build the app's initial model.
    :param warm_start: with ``initial_model="previous"``: the earlier run's ``"last"`` or ``"best"`` round.
    :param snapshot_uri: ``s3://bucket/prefix`` or ``file:///path`` (default
        ``$FLARE_SNAPSHOT_URI`` or ``file://$AIRFLOW_HOME/flare-snapshots``).
    :param aws_conn_id: an Airflow AWS connection for ``s3://`` (else the standard AWS chain).
    :param federation: the name runs are filed under (default: the DAG id).
    :param train_config: config every trainer gets (lr, epochs, ...); ``round_configs``
        maps a round number to overrides for that round.
    :param num_gpus: GPUs per site task (default: 1 where a site has GPUs). More than one:
        the task runs as that many ranks of PyTorch distributed, one GPU each (NCCL).
    :param num_processes: ranks per site task where it runs on CPU (a site without GPUs, or
        ``num_gpus=0``), with gloo; from 1 to the site's cores (default 1). See
        ``docs/apps.md``, "Several GPUs or processes at a site".
    :param evaluate: after the last hop, every site evaluates the final model.
    :param deferrable: wait for each hop in the triggerer, freeing the worker slot.
    :param poll_interval: seconds between two status polls by the trigger (deferrable mode).
    :param connect_grace: seconds a site may be unreachable when its hop is sent.
    :param flare_conn_id: the federation's ``flare`` connection (the server kit).
    :param mlflow_conn_id: an ``mlflow`` connection (a tracking server): the DAG run becomes an
        MLflow run with a child run per site, its metrics and the final model (``docs/tracking.md``).
    :param check_data: before the first round, every site summarizes its data (the trainer's
        ``describe``) and the run stops, nothing trained, naming the sites that fail
        ``{"schema": "equal", "min_samples": 100}`` (optional ``"timeout"`` in seconds);
        checked once per run (see ``docs/apps.md``).
    :param model_asset: the Asset of the global model, the task's outlet: each finished run
        emits an event with its run, round, digest and metrics (default:
        ``flare_provider.assets.model_asset(federation, snapshot_uri)``; docs/assets.md).

    Returns (to XCom): the snapshot URI, rounds and hops done, the hops skipped and why, the
    final metrics. Never weights.
    """

    template_fields: Sequence[str] = (
        "app_name", "num_rounds", "sites", "order", "seed", "train_timeout", "initial_model",
        "snapshot_uri", "federation", "train_config", "round_configs", "num_gpus", "num_processes",
    )
    template_fields_renderers = {"train_config": "json", "round_configs": "json"}
    ui_color = "#d8f0d8"

    def __init__(
        self,
        *,
        app_name: str,
        num_rounds: int | str = 3,
        sites: Sequence[str] | None = None,
        order: str = "fixed",
        seed: int | str = 0,
        on_failure: str = "stop",
        train_timeout: float | str = 3600.0,
        initial_model: str | None = None,
        warm_start: str = "last",
        snapshot_uri: str | None = None,
        aws_conn_id: str | None = None,
        federation: str | None = None,
        train_config: Mapping[str, Any] | None = None,
        round_configs: Mapping[int, Mapping[str, Any]] | None = None,
        num_gpus: int | None = None,
        num_processes: int | None = None,
        evaluate: bool = True,
        deferrable: bool = False,
        poll_interval: float = 2.0,
        connect_grace: float = 10.0,
        flare_conn_id: str = "flare_default",
        mlflow_conn_id: str | None = None,
        check_data: Mapping[str, Any] | None = None,
        model_asset: "Asset | None" = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.app_name = app_name
        self.num_rounds = num_rounds
        self.sites = list(sites) if sites is not None and not isinstance(sites, str) else sites
        self.order = order
        self.seed = seed
        self.on_failure = on_failure
        self.train_timeout = train_timeout
        self.initial_model = initial_model
        self.warm_start = warm_start
        self.snapshot_uri = snapshot_uri
        self.aws_conn_id = aws_conn_id
        self.federation = federation
        self.train_config = train_config if is_template(train_config) else dict(train_config or {})
        self.round_configs = round_configs if is_template(round_configs) else dict(round_configs or {})
        self.num_gpus = num_gpus
        self.num_processes = num_processes
        self.evaluate = evaluate
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.connect_grace = connect_grace
        self.flare_conn_id = flare_conn_id
        self.mlflow_conn_id = mlflow_conn_id
        self.check_data = dict(check_data or {})
        self._run: CyclicRun | None = None
        self._check_arguments()
        # the global model as an outlet Asset (docs/assets.md); None where it cannot be named yet
        self.model_asset = declare_model_outlet(self, model_asset)

    def _check_arguments(self) -> None:
        """Catch what is wrong at DAG parse time, without importing anything heavy."""
        problems = []
        rounds = self.num_rounds
        if not is_template(rounds) and (isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1):
            problems.append(f"num_rounds must be a positive integer, got {rounds!r}")
        if not is_template(self.order) and self.order not in ORDERS:
            problems.append(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if not is_template(self.seed) and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            problems.append(f"seed must be an integer, got {self.seed!r}")
        if self.on_failure not in ON_FAILURE:
            problems.append(f"on_failure must be one of {', '.join(ON_FAILURE)}, got {self.on_failure!r}")
        timeout = self.train_timeout
        if not is_template(timeout) and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
            problems.append(f"train_timeout must be a number of seconds > 0, got {timeout!r}")
        problems += run_problems(self)
        problems += check_problems(self.check_data)
        problems += selection_problems(self)
        if problems:
            raise ValueError(f"{type(self).__name__} {self.task_id!r}: " + "; ".join(problems))

    def _build_run(self, context: Any) -> "CyclicRun":
        from flare_provider.federation.cyclic import CyclicRun
        from flare_provider.federation.cyclic_plan import CyclicPlan
        from flare_provider.federation.records import RunSpec
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
                min_clients=1,
                wait_time_after_min_received=0.0,
                train_timeout=float(self.train_timeout),
                aggregator="cyclic",  # no aggregation: the name says so in each committed state
                train_config=rendered_mapping(self.train_config, "train_config"),
                round_configs={int(k): v for k, v in rendered_mapping(self.round_configs, "round_configs").items()},
                num_gpus=self.num_gpus,
                num_processes=None if self.num_processes is None else int(self.num_processes),
                connect_grace=float(self.connect_grace),
                status_poll_interval=float(self.poll_interval),
            )
            self._run = CyclicRun(
                spec,
                kit,
                SnapshotStoreHook(self.snapshot_uri, self.aws_conn_id).get_store(),
                plan=CyclicPlan(self.order, int(self.seed), self.on_failure),
                initial_model=self.initial_model,
                warm_start=self.warm_start,
                logger=self.log,
                extra_state={"airflow": {"dag_id": self.dag_id, "task_id": self.task_id, "run_id": context["run_id"]}},
                mlflow=mlflow_settings(self.mlflow_conn_id),  # docs/tracking.md
            )
        except (ValueError, FlareConnectionError) as exc:
            # Wrong arguments or connection: a retry cannot fix it, and no site was contacted.
            raise AirflowFailException(str(exc)) from exc
        return self._run

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
                return self._next_hop_or_finish(run, progress)
            return self._finish(run, run.run_hops(progress))

    def execute_complete(self, context: Any, event: dict[str, Any], flight: dict[str, Any] | None = None) -> dict[str, Any]:
        """Back from the trigger: finish the hop it watched, then defer for the next one or finish."""
        with self._build_run(context) as run:
            return self._next_hop_or_finish(run, run.resume_hop(taken_up(flight, event), event))

    def _next_hop_or_finish(self, run: "CyclicRun", progress: "Progress") -> dict[str, Any]:
        """Deferrable mode: send the next hop and hand its waiting to the triggerer."""
        while not run.finished(progress):
            flight = run.send(progress)
            if not flight.active_tasks:  # the site did not take it: stop or skip, here and now
                progress = run.finish_hop(progress, flight, {})
                continue
            run.in_flight = None  # the trigger watches it now; this process lets go
            defer_step(self, self.flare_conn_id, flight, run.rule(flight).to_dict(), run.spec.status_poll_interval)
        return self._finish(run, progress)

    def _finish(self, run: "CyclicRun", progress: "Progress") -> dict[str, Any]:
        spec = run.spec
        uri = run.finalize(progress)
        result: dict[str, Any] = {
            "federation": spec.federation,
            "run_id": spec.run_id,
            "rounds_done": progress.round // len(spec.sites),
            "hops_done": progress.round,
            "skipped": {str(r.round): r.dropped for r in progress.history if not r.accepted},
            "snapshot_uri": uri,
            "model_uri": f"{uri}/model.safetensors",
            "final_metrics": progress.metrics,
        }
        if self.evaluate:
            evaluation = run.evaluate(progress)
            result["evaluation"] = evaluation
            self.log.info("Final evaluation: global %s; per site %s", evaluation["global"],
                          {s: r.get("metrics", r.get("error")) for s, r in evaluation["sites"].items()})
        record_model(self, run, result)
        self.log.info("Cyclic run of %s finished %d hops; model at %s", spec.federation, progress.round, result["model_uri"])
        return result

    def get_openlineage_facets_on_start(self) -> Any:
        from flare_provider.lineage import facets_on_start

        return facets_on_start(self)

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        from flare_provider.lineage import facets_on_complete

        return facets_on_complete(self)

    def on_kill(self) -> None:
        """Marked failed or cleared in the UI: stop the site's training of the hop in flight."""
        if self._run is not None:
            self._run.abort()
