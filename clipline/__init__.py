"""clipline's top floor: the ``clipline`` command line, the local stack, the HTTP job API
and its Python client.

Builds on the services (``workers``, ``gpu_service``) and on ``clipline_core``. Must not
import ``clipline_bench`` (``clipline bench`` finds the benchmarks by entry point).
"""
