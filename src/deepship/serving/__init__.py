"""HTTP serving of a model package, torch-free: `deepship serve`.

app.py (routes, create_app), state.py (the served models: reload, rollback, SIGHUP), requests.py
(request validation), modality.py (what differs between texts and images), schemas.py (the wire
format), metrics.py (Prometheus metrics and the request middleware), batching.py (micro-batching),
predlog.py (the prediction log) and settings.py (the serve settings).

Nothing heavy is imported here: `deepship.cli` imports `deepship.serving.cli` to build its parser.
"""
