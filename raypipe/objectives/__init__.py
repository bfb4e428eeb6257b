"""Self-supervised pretraining objectives, one small file each, behind `Objective`."""

from raypipe.objectives.base import Objective, build_objective

__all__ = ["Objective", "build_objective"]
