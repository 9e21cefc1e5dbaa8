"""What an engine returns for one page: its generated tokens and why it stopped.

Shared by both engines (pipeline/model/engine.py, pipeline/model/continuous.py): neither imports the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Generation:
    tokens: list[int]  # generated tokens, ending with the stop token when there is one
    finish_reason: str  # "stop" | "length"

    @classmethod
    def from_tokens(cls, tokens: list[int], stop_ids: list[int]) -> "Generation":
        """Cut at the first stop token (kept): what follows it is padding or the engine's run-on."""
        end = next((i for i, t in enumerate(tokens) if t in stop_ids), None)
        return cls(tokens, "length") if end is None else cls(tokens[: end + 1], "stop")
