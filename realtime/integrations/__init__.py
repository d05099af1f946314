"""Task-queue integrations: a task's progress on `run.<task id>`, its lifecycle on topic `run`.

One module per queue (`celery`, `rq`, `dramatiq`), each imported only by whoever
uses it, each needing its own `requirements-<queue>.txt`. They publish with
`realtime.publisher` (the worker reads `DATABASE_URL`) and share `lifecycle`,
so a browser watching a Celery task sees what it sees for this project's own
runs: `static/realtime.js` with `closeOnRunEnd` stops at the end.
"""
