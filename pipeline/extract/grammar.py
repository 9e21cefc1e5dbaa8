"""Constrained decoding: the xgrammar grammar compiled from a schema, the logits processor that applies it, and the
guard that stops a generation repeating itself.
"""

from __future__ import annotations

import json
from typing import Any

from docpipe.config import ExtractOptions
from docpipe.errors import ConfigError, describe
from docpipe.extract.schema import generation_schema


# xgrammar writes a length-capped string's characters as [^"\\\r\n], which admits raw control characters
# that JSON forbids (its unbounded strings exclude them). Patched in the grammar text.
_CAPPED_CHARS = '[^\\"\\\\\\r\\n]'


_JSON_CHARS = '[^\\0-\\x1f\\"\\\\\\r\\n]'


def build_grammar(schema: dict[str, Any], opts: ExtractOptions):
    """The grammar for a schema: capped (generation_schema), compact separators, no free whitespace, so not
    one token is spent on formatting. Needs no tokenizer, so the driver can check a schema up front."""
    import xgrammar as xgr

    try:
        grammar = xgr.Grammar.from_json_schema(
            json.dumps(generation_schema(schema, opts)), any_whitespace=False, separators=(",", ":")
        )
        return xgr.Grammar.from_ebnf(str(grammar).replace(_CAPPED_CHARS, _JSON_CHARS))
    except Exception as exc:
        raise ConfigError(f"cannot build a grammar for the schema: {describe(exc)}") from None


def repetition_end(tokens: list[int], limit: int) -> int:
    """Length of ``tokens`` up to the first run of ``limit`` equal tokens (where the guard stopped the row)."""
    run = 1
    for i in range(1, len(tokens)):
        run = run + 1 if tokens[i] == tokens[i - 1] else 1
        if run >= limit:
            return i + 1
    return len(tokens)


class GrammarProcessor:
    """xgrammar's token masks for a batch of rows, one matcher each. Unlike xgrammar's own HF processor it
    leaves alone rows that generate() has finished by a stopping criterion (the repetition guard), which
    then receive padding the grammar would refuse."""

    def __init__(self, grammar, rows: int, guard: "RepetitionGuard"):
        import xgrammar as xgr

        self.matchers = [xgr.GrammarMatcher(grammar) for _ in range(rows)]
        self.bitmask = xgr.allocate_token_bitmask(rows, grammar.tokenizer_info.vocab_size)
        self.guard, self.started = guard, False

    def __call__(self, input_ids, scores):
        import xgrammar as xgr

        # Every row's last token in one copy: one GPU sync a step, not one a row.
        last = input_ids[:, -1].tolist() if self.started else []
        for i, matcher in enumerate(self.matchers):
            if self.started and i not in self.guard.rows and not matcher.is_terminated():
                if not matcher.accept_token(last[i]):
                    raise RuntimeError(f"row {i}: the grammar refused a token it had allowed")
            if not matcher.is_terminated():
                matcher.fill_next_token_bitmask(self.bitmask, i)
        self.started = True
        device = scores.device
        scores = scores if device.type in ("cuda", "cpu") else scores.to("cpu")
        xgr.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device))
        return scores.to(device)


class RepetitionGuard:
    """Stops generation when one token repeats ``limit`` times in a row: a run-away loop, not content."""

    def __init__(self, limit: int):
        self.limit, self.tripped, self.rows = limit, False, set()

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if input_ids.shape[1] >= self.limit:
            tail = input_ids[:, -self.limit :]
            done = (tail == tail[:, :1]).all(dim=1)
            if done.any():
                self.tripped = True
                self.rows.update(i for i in done.nonzero().flatten().tolist())
        return done
