"""sslprobe: online probes that report how good a representation is while it trains."""

from sslprobe.callbacks import (
    AlphaReQ,
    LiDAR,
    OnlineKNN,
    OnlineProbe,
    ProbeSweep,
    RankMe,
    RefitProbe,
    TrainableCallback,
)
from sslprobe.layer import Layer
from sslprobe.module import Module
from sslprobe.optim import LARS, create_optimizer, create_scheduler
from sslprobe.probes import AttentiveProbe, LinearProbe, MLPProbe

__version__ = "0.1.0"

__all__ = [
    "LARS",
    "AlphaReQ",
    "AttentiveProbe",
    "Layer",
    "LiDAR",
    "LinearProbe",
    "MLPProbe",
    "Module",
    "OnlineKNN",
    "OnlineProbe",
    "ProbeSweep",
    "RankMe",
    "RefitProbe",
    "TrainableCallback",
    "__version__",
    "create_optimizer",
    "create_scheduler",
]
