"""Evaluation from predictions: metrics, calibration and confidence thresholds (torch, any device)."""
