"""Model families: what differs between the vision-language models docpipe runs, one module per family.

A family knows, for its checkpoints: how a page's prompt and model inputs are built from its image, how many
image tokens a page costs at most, its vision encoder and connector, the render size its processor uses, its OCR
and extraction prompts, which tokens end an answer, and how its raw output becomes our Markdown (and, where the
model gives boxes, the page's layout blocks). The stages, the engines and the sizing ask the family of the loaded
model (``LoadedModel.family``) and stay family-blind.

- Idefics2 (``idefics2.py``): Idefics2ForConditionalGeneration, the default (idefics2-8b).
- Idefics3 (``idefics3.py``): Idefics3ForConditionalGeneration: Idefics3-8B, SmolVLM, and the DocTags writers
  SmolDocling-256M and granite-docling-258M (told apart by their tokenizer: ``<doctag>`` is one of its tokens).
- LightOnOCR (``lighton.py``): LightOnOcrForConditionalGeneration (LightOnOCR-2-1B).

Every one splices image features into the decoder's input at image-token positions, which is what the continuous
engine's feature bank serves. A model that injects them elsewhere (DeepStack: granite-docling-500m's
GraniteDoclingForConditionalGeneration) is refused with a one-line error naming the supported families.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from docpipe.model.families.base import Family

SUPPORTED = ("Idefics2 (Idefics2ForConditionalGeneration: idefics2-8b), Idefics3 (Idefics3ForConditionalGeneration: "
             "Idefics3-8B, SmolVLM, SmolDocling, granite-docling-258M) and LightOnOCR "
             "(LightOnOcrForConditionalGeneration: LightOnOCR-2-1B)")

# Architectures transformers ships that a user may reach for, with why docpipe can't serve them (yet).
NOT_YET = {
    "GraniteDoclingForConditionalGeneration": "it injects image features into several decoder layers (DeepStack), "
    "not only at the input, which the feature bank cannot serve",
    "SmolVLMForConditionalGeneration": "SmolVLM2 (video and multi-image) is not supported yet",
}


def _classes() -> list[type[Family]]:
    from docpipe.model.families.idefics2 import Idefics2
    from docpipe.model.families.idefics3 import Idefics3
    from docpipe.model.families.lighton import LightOnOcr

    return [Idefics2, Idefics3, LightOnOcr]


class UnsupportedArchitecture(ValueError):
    """A checkpoint of a family docpipe does not run; the message is one line naming the supported ones."""


def family_class(config: dict[str, Any], name: str = "the model") -> type[Family]:
    """The family of a checkpoint's config.json (its architectures, else its model_type)."""
    architectures = list(config.get("architectures") or [])
    model_type = config.get("model_type")
    for cls in _classes():
        if any(a in cls.architectures for a in architectures) or (not architectures and model_type in cls.model_types):
            return cls
    what = architectures[0] if architectures else f"model_type {model_type!r}"
    why = next((f": {reason}" for arch, reason in NOT_YET.items() if arch in architectures), "")
    raise UnsupportedArchitecture(f"{name} is a {what}, not a supported architecture{why}; docpipe runs {SUPPORTED}")


def family_of(model, processor) -> Family:
    """The family of a loaded model, bound to its processor (which tells flavours apart: DocTags or Markdown)."""
    config = model.config
    return family_class({"architectures": [type(model).__name__], "model_type": config.model_type})(processor)


def checkpoint_config(checkpoint: str) -> dict[str, Any] | None:
    """A local checkpoint's config.json, or the hub's copy in the local cache; None when neither is here."""
    local = Path(checkpoint)
    if local.is_dir():
        path = local / "config.json"
        return json.loads(path.read_text()) if path.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(checkpoint, "config.json")
    except Exception:  # not a valid repo id: from_pretrained says what it makes of it
        return None
    return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None


__all__ = ["Family", "SUPPORTED", "UnsupportedArchitecture", "family_class", "family_of", "checkpoint_config"]
