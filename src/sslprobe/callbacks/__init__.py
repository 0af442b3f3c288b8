"""Lightning callbacks that train and evaluate probes beside the main model."""

from sslprobe.callbacks.base import TrainableCallback
from sslprobe.callbacks.online_probe import OnlineProbe

__all__ = ["OnlineProbe", "TrainableCallback"]
