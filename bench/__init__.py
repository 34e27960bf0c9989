"""``make bench``: what the service costs next to what a user would otherwise run.

Entry point: ``python -m bench.run`` (see :mod:`bench.run`).  ``soak/`` reuses the
helpers in :mod:`bench.common` and the instrumented worker in :mod:`bench.instrumented`.
"""
