"""Optimizers and the factories that build them: plain PyTorch, no Lightning."""

from sslprobe.optim.conditional_step import conditional_step
from sslprobe.optim.factories import create_optimizer, create_scheduler
from sslprobe.optim.lars import LARS

__all__ = ["LARS", "conditional_step", "create_optimizer", "create_scheduler"]
