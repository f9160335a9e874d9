"""Task prompts: the text prefixes cde-small-v2 was trained with (docs/model.md, "Task
prefixes"). The API, the CLI, training and the MTEB wrapper all take them from here."""

from __future__ import annotations

from .validation import UserError

QUERY = "search_query: "
DOCUMENT = "search_document: "  # also every minicorpus document
CLASSIFICATION = "classification: "
CLUSTERING = "clustering: "

# `encode(prompt_name=...)` names.
PROMPTS = {"query": QUERY, "document": DOCUMENT}


def by_name(prompt_name: str | None) -> str:
    """The prefix for `prompt_name` ("query", "document"; None: no prefix)."""
    if prompt_name is None:
        return ""
    if prompt_name not in PROMPTS:
        raise UserError(f"prompt_name must be one of {sorted(PROMPTS)}, got {prompt_name!r}")
    return PROMPTS[prompt_name]
