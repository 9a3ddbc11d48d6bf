"""Online learners: feature encoding, backbone, Kalman heads, UPGD, LR schedules."""

from learners.protocol import Predictor, StreamModel, as_stream_model
from learners.registry import build_model

__all__ = ["Predictor", "StreamModel", "as_stream_model", "build_model"]
