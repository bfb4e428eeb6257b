"""Fine-tuning tasks: a pretrained backbone plus a head, behind `Task`."""

from raypipe.tasks.base import Task, build_task

__all__ = ["Task", "build_task"]
