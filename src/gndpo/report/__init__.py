"""Metric loggers (jsonl, TensorBoard, W&B) and training-dynamics plots.

matplotlib, TensorBoard and W&B are imported only when a plot or a logger of that kind is made.
"""
from gndpo.report.loggers import (
    JsonlLogger,
    MetricsLogger,
    MultiLogger,
    TensorBoardLogger,
    WandbLogger,
    build_loggers,
    read_metrics,
)
from gndpo.report.plot import plot_dynamics, plot_run_dirs

__all__ = [
    "JsonlLogger",
    "MetricsLogger",
    "MultiLogger",
    "TensorBoardLogger",
    "WandbLogger",
    "build_loggers",
    "plot_dynamics",
    "plot_run_dirs",
    "read_metrics",
]
