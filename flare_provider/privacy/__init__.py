"""Central differential privacy on the Airflow side: its settings and the privacy spent.

No numpy and no accountant at import: :mod:`.central` checks an operator's ``central_dp``
argument at DAG parse time; the accountant (``prv-accountant``, the ``privacy`` extra) is
imported only when a round's epsilon is computed. The mechanism itself, clipping and
noise around a mean-based aggregator, is :mod:`flare_provider.aggregation.central_dp`.
See ``docs/privacy.md``.
"""
