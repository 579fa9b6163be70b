"""Model selection: sweeps (Optuna), latency budget, cross-validation, learning curves, leaderboard."""
