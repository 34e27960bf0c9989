"""``ai-service dashboard``: one web page with every worker, job, training curve and queue.

A BE-side process (no torch): :mod:`~ai_service.dashboard.feed` binds a queue of its own
to ``EVENTS_EXCHANGE`` with ``#`` (never taking the BE's messages) and fills the bounded
in-memory :mod:`~ai_service.dashboard.state`, rebuilt from the job records in storage at
start; :mod:`~ai_service.dashboard.app` serves the page, its JSON and a Server-Sent
Events stream on the workers' HTTP stack (same server, same ``HTTP_TOKEN`` rules).
"""
