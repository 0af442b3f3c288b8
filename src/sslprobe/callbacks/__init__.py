"""Lightning callbacks that train and evaluate probes beside the main model."""

from sslprobe.callbacks.base import TrainableCallback
from sslprobe.callbacks.health import AlphaReQ, LiDAR, RankMe
from sslprobe.callbacks.online_knn import OnlineKNN
from sslprobe.callbacks.online_probe import OnlineProbe
from sslprobe.callbacks.probe_sweep import ProbeSweep
from sslprobe.callbacks.refit_probe import RefitProbe

__all__ = ["AlphaReQ", "LiDAR", "OnlineKNN", "OnlineProbe", "ProbeSweep", "RankMe", "RefitProbe", "TrainableCallback"]
