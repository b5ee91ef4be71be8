"""clipline's ground floor: what every process shares, importing nothing else of clipline.

``constants`` (wire names: queues, keys, metric names, headers), ``settings`` (the one
``Settings`` tree read from ``CLIPLINE_*``), ``errors`` (stable error codes), ``metrics``
(metric definitions, one registry per process role; ``job_metrics`` the job outcomes and
states, kept in Redis), ``job`` (the job model and its states), ``schema`` (the public
JSON shapes of a job), ``store`` (the job store in Redis), ``signing`` (callback
signatures), ``httpserve`` (the metrics endpoint and probes), ``localredis`` (a Redis
URL, or an embedded server) and ``procs`` (process helpers).

Must not import ``gpu_service``, ``workers``, ``clipline``, ``clipline_operator`` or
``clipline_bench``: they all build on this package (``tests/test_layout.py`` checks).
"""
