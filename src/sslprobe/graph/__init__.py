"""The CUDA-graph step: a callback's training step captured once and replayed (one component, used by the base)."""

from sslprobe.graph.capture import StepGraph
from sslprobe.graph.graphed_step import GraphedStep, StepParts

__all__ = ["GraphedStep", "StepGraph", "StepParts"]
