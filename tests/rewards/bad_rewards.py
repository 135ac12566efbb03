"""User reward functions for the tests (imported by path, as a user's would be)."""

from __future__ import annotations


def length_reward(completions, examples):
    return [len(c) / 10 for c in completions]


def wrong_count(completions, examples):
    return [1.0]


def not_a_list(completions, examples):
    return 1.0


def nan_reward(completions, examples):
    return [float("nan")] * len(completions)


NOT_CALLABLE = 3


def never_refuses(prompt, completion):
    """A user refusal classifier (safety.classifier / the refusal reward's ``classifier`` option)."""
    return False


def calls(completions, examples):
    """Records the examples it was called on (routing: a reward sees only the sources it scores)."""
    CALLED.append([e.get("_source") for e in examples])
    return [1.0] * len(completions)


CALLED: list = []
