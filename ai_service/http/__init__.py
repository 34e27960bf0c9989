"""HTTP: one ASGI server per worker process (CONTRACT.md "HTTP", README "HTTP").

``app.create_app`` builds the FastAPI application (``/healthz``, ``/readyz``,
``/metrics``, ``/openapi.json`` and the ``/v1`` routers), ``server.HttpServer`` runs it
with uvicorn on a daemon thread of the worker, bounded against slow, idle and numerous
clients.  FastAPI is imported only here and in the worker, never by the BE-side tools.
"""
