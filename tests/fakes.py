"""Test helpers: the in-process Grid lives in server/inprocess.py (benchmarks use it too)."""

from server.inprocess import Fault, InProcessGrid, synthetic_node_configs

__all__ = ["Fault", "InProcessGrid", "synthetic_node_configs"]
