"""The GPU inference daemon: owns the device, batches chunks from the shared-memory arena
dynamically, runs the registered models, publishes results; plus the client side the
workers use to reach it (producer, protocol).

Builds on ``clipline_core`` only. Must not import ``workers``, ``clipline``,
``clipline_operator`` or ``clipline_bench``.
"""
