"""Drift detection and label-free performance estimation.

``CBPE`` / ``MCBPE`` are the estimation API of the contract; ``ModelMonitor`` is what the service
drives per model; the detectors are usable on their own.
"""

from drift.cbpe import CBPE
from drift.data_drift import DataDriftMonitor
from drift.detectors import DETECTORS, ConceptDriftDetector, DriftEvent
from drift.mcbpe import MCBPE
from drift.monitor import ModelMonitor

__all__ = ["CBPE", "DETECTORS", "MCBPE", "ConceptDriftDetector", "DataDriftMonitor", "DriftEvent", "ModelMonitor"]
