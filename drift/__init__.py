"""Drift detection and label-free performance estimation."""
