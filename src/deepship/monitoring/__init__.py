"""Monitoring: reference profile at export, drift and performance per window of a prediction log or dataset, alerts."""
