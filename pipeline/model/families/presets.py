"""Short names for the checkpoints docpipe runs (``--model NAME``): the hub checkpoint, and what the model's
authors recommend where it differs from the family's defaults. The render size always comes from the checkpoint's
own processor (pipeline/model/load.py: render_edge_for); ``--random-weights NAME`` builds the architecture shipped
as pipeline/model/assets/NAME.json (the real checkpoint's config.json values)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    repo: str  # hub id
    family: str
    prompt: str | None = None  # None: the family's OCR prompt
    max_new_tokens: int | None = None  # None: the family's budget, else ModelOptions' default


PRESETS: dict[str, Preset] = {
    "idefics2-8b": Preset("HuggingFaceM4/idefics2-8b", "Idefics2"),
    "idefics3-8b": Preset("HuggingFaceM4/Idefics3-8B-Llama3", "Idefics3"),
    "smolvlm-256m": Preset("HuggingFaceTB/SmolVLM-256M-Instruct", "Idefics3"),
    "smolvlm-500m": Preset("HuggingFaceTB/SmolVLM-500M-Instruct", "Idefics3"),
    # DocTags writers: docling's own budget of 8192 tokens a page (the family's)
    "smoldocling-256m": Preset("docling-project/SmolDocling-256M-preview", "Idefics3"),
    "granite-docling-258m": Preset("ibm-granite/granite-docling-258M", "Idefics3"),
    # LightOn's client and vLLM examples: the page alone, up to 4096 tokens
    "lightonocr-2-1b": Preset("lightonai/LightOnOCR-2-1B", "LightOnOCR", max_new_tokens=4096),
}
