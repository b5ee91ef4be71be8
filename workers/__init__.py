"""The CPU workers: Celery tasks that fetch, decode and preprocess a job's media, hand the
frames to the GPU daemon through shared memory, select the highlight and render it.

Builds on ``clipline_core`` (settings, job model and store) and on ``gpu_service``'s
client side (the shared-memory producer and the protocol). Must not import
``clipline`` (the CLI, API and local stack sit above) or ``clipline_bench``.
"""
