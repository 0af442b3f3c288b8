"""sslprobe: online probes that report how good a representation is while it trains."""

from sslprobe.callbacks import OnlineProbe, TrainableCallback
from sslprobe.module import Module
from sslprobe.optim import LARS, create_optimizer, create_scheduler

__version__ = "0.1.0"

__all__ = [
    "LARS",
    "Module",
    "OnlineProbe",
    "TrainableCallback",
    "__version__",
    "create_optimizer",
    "create_scheduler",
]
