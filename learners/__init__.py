"""Online learners: feature encoding, backbone, Kalman heads, UPGD, LR schedules."""

from learners.encoder import FeatureEncoder
from learners.estimator import KalmanClassifier, KalmanPredictor, KalmanRegressor
from learners.kalman import KalmanHead
from learners.protocol import ModelUnavailable, Predictor, RowsRejected, StreamModel, as_stream_model
from learners.registry import build_model

__all__ = [
    "FeatureEncoder",
    "KalmanClassifier",
    "KalmanHead",
    "KalmanPredictor",
    "KalmanRegressor",
    "ModelUnavailable",
    "Predictor",
    "RowsRejected",
    "StreamModel",
    "as_stream_model",
    "build_model",
]
