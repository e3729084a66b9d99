"""``CrossSiteEvalOperator``: cross-site evaluation of a federated run as one Airflow task.

Every site scores the run's global model and, where a site allowed it
(``share_local_model: true`` in its ``local/site.yaml``), every site's local model of the
run's last round. The matrix (model x site x metric) is stored with the run in the
snapshot store (``cross_site/matrix.json``), the Federation page draws it, and XCom gets a
summary: each model's mean of every metric over the sites, and the best model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from flare_provider.operators.arguments import is_template as _is_template
from flare_provider.operators.arguments import run_problems

_MODES = ("max", "min")  # as flare_provider.federation.cross_site_matrix.MODES, without importing the engine


class CrossSiteEvalOperator(BaseOperator):
    """Have every site score the global model and the sites' shared local models of a run.

    The run is the one the training task ``train_task_id`` reports in XCom (its federation,
    run id and output model's round): put this task after a ``ScatterGatherOperator``. Or
    name it with ``federation`` and ``run_id`` (which also override what XCom says).

    :param app_name: the deployed app whose trainer evaluates (its ``evaluate``).
    :param train_task_id: the training task of this DAG run to take the run from; None to
        use only ``federation``, ``run_id`` and ``model_round``.
    :param federation: the name the run is filed under (default: XCom's, else the DAG id).
    :param run_id: the run (default: XCom's, else this DAG run's id).
    :param model_round: the round whose global model is scored (default: the round of the
        training task's output model, else the run's final round, else its newest).
    :param sites: the sites that evaluate (default: every site of the connection).
    :param eval_config: config every evaluate task's trainer gets.
    :param eval_timeout: seconds one site may take to score one model.
    :param best_metric: the metric the best model is picked by (its mean over the sites);
        None picks none.
    :param best_mode: ``"max"`` (higher is better) or ``"min"``.
    :param snapshot_uri: ``s3://bucket/prefix`` or ``file:///path`` (default
        ``$FLARE_SNAPSHOT_URI`` or ``file://$AIRFLOW_HOME/flare-snapshots``).
    :param aws_conn_id: an Airflow AWS connection for ``s3://`` (else the standard AWS chain).
    :param connect_grace: seconds a site may be unreachable when a task is sent to it.
    :param flare_conn_id: the federation's ``flare`` connection (the server kit).

    Returns (to XCom): the matrix's URI and per model its mean metrics over the sites, the
    best model, the sites that did not share their model. Never weights.
    """

    template_fields: Sequence[str] = (
        "app_name", "train_task_id", "federation", "run_id", "model_round", "sites", "eval_config",
        "best_metric", "snapshot_uri",
    )
    template_fields_renderers = {"eval_config": "json"}
    ui_color = "#f3e1ff"

    def __init__(
        self,
        *,
        app_name: str,
        train_task_id: str | None = "train",
        federation: str | None = None,
        run_id: str | None = None,
        model_round: int | str | None = None,
        sites: Sequence[str] | None = None,
        eval_config: Mapping[str, Any] | None = None,
        eval_timeout: float = 3600.0,
        best_metric: str | None = "accuracy",
        best_mode: str = "max",
        snapshot_uri: str | None = None,
        aws_conn_id: str | None = None,
        connect_grace: float = 10.0,
        flare_conn_id: str = "flare_default",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.app_name = app_name
        self.train_task_id = train_task_id
        self.federation = federation
        self.run_id = run_id
        self.model_round = model_round
        self.sites = list(sites) if sites is not None and not isinstance(sites, str) else sites
        self.eval_config = dict(eval_config or {})
        self.eval_timeout = eval_timeout
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.snapshot_uri = snapshot_uri
        self.aws_conn_id = aws_conn_id
        self.connect_grace = connect_grace
        self.flare_conn_id = flare_conn_id
        self._check_arguments()

    def _check_arguments(self) -> None:
        """Catch what is wrong at DAG parse time, without importing anything heavy."""
        problems = []
        if not isinstance(self.app_name, str) or not self.app_name:
            problems.append(f"app_name must be the name of a deployed app, got {self.app_name!r}")
        rnd = self.model_round
        if rnd is not None and not _is_template(rnd) and (isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0):
            problems.append(f"model_round must be a round number >= 0, got {rnd!r}")
        problems += run_problems(self)
        value = self.eval_timeout
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            problems.append(f"eval_timeout must be a number of seconds > 0, got {value!r}")
        if self.best_metric is not None and (not isinstance(self.best_metric, str) or not self.best_metric):
            problems.append(f"best_metric must be a metric name or None, got {self.best_metric!r}")
        if self.best_mode not in _MODES:
            problems.append(f"best_mode must be one of {', '.join(_MODES)}, got {self.best_mode!r}")
        if problems:
            raise ValueError(f"{type(self).__name__} {self.task_id!r}: " + "; ".join(problems))

    def _target(self, context: Any) -> tuple[str, str, int | None]:
        """(federation, run id, round of the global model) from the arguments and the training task's XCom."""
        trained: Mapping[str, Any] = {}
        if self.train_task_id:
            pulled = context["ti"].xcom_pull(task_ids=self.train_task_id)
            if not isinstance(pulled, Mapping) or not pulled.get("run_id"):
                raise AirflowFailException(
                    f"task {self.train_task_id!r} of this DAG run returned no training run in XCom (got {pulled!r}); "
                    "run this task after it, or give federation and run_id with train_task_id=None"
                )
            trained = pulled
        federation = self.federation or trained.get("federation") or self.dag_id
        run_id = self.run_id or trained.get("run_id") or context["run_id"]
        model_round = self.model_round
        if model_round in (None, "") and trained:
            # A scatter-gather task names the round of its output model; without one, the run's final round.
            output = trained.get(trained.get("output_model") or "last")
            model_round = output.get("round") if isinstance(output, Mapping) else None
        return str(federation), str(run_id), int(model_round) if model_round not in (None, "") else None

    def execute(self, context: Any) -> dict[str, Any]:
        from flare_provider.federation.cross_site import CrossSiteEval
        from flare_provider.hooks.flare import FlareConnectionError, FlareHook
        from flare_provider.hooks.snapshots import SnapshotStoreHook
        from flare_provider.snapshots import SnapshotCorrupted

        federation, run_id, model_round = self._target(context)
        try:
            kit = FlareHook(self.flare_conn_id).get_kit()
            evaluation = CrossSiteEval(
                kit,
                SnapshotStoreHook(self.snapshot_uri, self.aws_conn_id).get_store(),
                federation,
                run_id,
                self.app_name,
                sites=self.sites,
                model_round=model_round,
                config=self.eval_config,
                eval_timeout=float(self.eval_timeout),
                connect_grace=float(self.connect_grace),
                logger=self.log,
            )
        except (ValueError, FlareConnectionError) as exc:
            # Wrong arguments or connection: a retry cannot fix it, and no site was contacted.
            raise AirflowFailException(str(exc)) from exc
        with evaluation:
            try:
                matrix = evaluation.run()
            except SnapshotCorrupted as exc:  # no such run or round, or a damaged model: a retry cannot help
                raise AirflowFailException(f"cannot evaluate run {run_id!r}: {exc}") from exc
            # RoundFailed (no site scored anything) is left to Airflow's retries: the sites may come back.
            summary = matrix.summary(evaluation.matrix_uri, self.best_metric, self.best_mode)
        for name, row in summary["models"].items():
            self.log.info("Cross-site: %s model (round %s) scored at %d sites, mean %s",
                          name, row["round"], row["sites_evaluated"], row["mean"])
        if summary["best"] is not None:
            self.log.info("Best model by mean %s: %s (%s)", self.best_metric, summary["best"]["model"], summary["best"]["value"])
        return summary
