"""HTTP serving of a model package, torch-free: `deepship serve` (app.py), micro-batching (batching.py),
the prediction log (predlog.py) and the serve settings (settings.py).

Nothing heavy is imported here: `deepship.cli` imports `deepship.serving.cli` to build its parser.
"""
