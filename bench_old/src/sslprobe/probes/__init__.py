"""Probe modules: plain ``nn.Module``s to pass as ``OnlineProbe(probe=...)``; they never see the Trainer."""

from sslprobe.probes.attentive import AttentiveProbe
from sslprobe.probes.feature_norm import FeatureNorm
from sslprobe.probes.linear import LinearProbe
from sslprobe.probes.mlp import MLPProbe

__all__ = ["AttentiveProbe", "FeatureNorm", "LinearProbe", "MLPProbe"]
