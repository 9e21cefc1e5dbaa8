"""LightOnOCR (LightOnOCR-2-1B): a Pixtral vision encoder at the page's own resolution (up to 1540 px, 14 px patches
merged 2 x 2, so one image token per 28 x 28 px: up to 3,025 a page), a projector, and a Qwen3 decoder. An OCR-only
model: it is sent the page image alone and answers with Markdown (HTML tables, LaTeX math), which
pipeline/model/families/markdown.py brings to our conventions."""

from __future__ import annotations

from docpipe.model.families.base import Family


class LightOnOcr(Family):
    name = "LightOnOCR"
    architectures = ("LightOnOcrForConditionalGeneration",)
    model_types = ("lighton_ocr",)
    vision_modules = ("vision_encoder", "vision_projection")
    connector = "vision_projection"
    decoder = "language_model"

    @property
    def follows_instructions(self) -> bool:
        return False

    @property
    def ocr_prompt(self) -> str:
        return ""  # the model card's request: the page image and nothing else

    def image_features(self, model, inputs, part: slice):
        return model.get_image_features(pixel_values=inputs["pixel_values"][part],
                                        image_sizes=inputs["image_sizes"][part]).pooler_output

    def page_output(self, raw: str):
        from docpipe.model.families.markdown import normalise_markdown

        return normalise_markdown(raw), None
