"""The loop's error type, in a module of its own so that the loop's collaborators (resume checks,
checkpointing) and the callers that catch it import it without importing the loop."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """The run cannot go on for a reason the user can act on (the message says which)."""
