"""What a run is asked to do with its data (classification, Q&A): chosen by the config's `task` node (`_target_`)."""

from llmtune.tasks.base import Task, task_of

__all__ = ["Task", "task_of"]
