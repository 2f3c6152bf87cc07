"""Errors on one line: what the command line prints, and what lm-lstm's own errors quote of another's."""

from __future__ import annotations


def first_line(error: BaseException) -> str:
    """The error's message on one line (its type's name if it has none): the first line, joined to the next where it
    only announces it (torch's "Error(s) in loading state_dict for X:" then the mismatch), and to the list items
    ("- ...") that follow it (transformers' "... but found" then "- Evaluation strategy: no")."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    joined = lines[:2] if lines[0].endswith(":") else lines[:1]
    for line in lines[len(joined):]:
        if not line.startswith("- "):
            break
        joined.append(line)
    return " ".join(joined)
