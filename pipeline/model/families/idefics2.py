"""Idefics2 (idefics2-8b, the default): a perceiver connector of 64 latents per image, and with image splitting
4 crops plus the whole page (5 images, 320 image tokens a page whatever its shape)."""

from __future__ import annotations

from typing import Any

from docpipe.model.families.base import Family

CROPS = 5  # with splitting: 4 crops and the whole page


class Idefics2(Family):
    name = "Idefics2"
    architectures = ("Idefics2ForConditionalGeneration",)
    model_types = ("idefics2",)
    expands_without_images = True

    def model_inputs(self, m, prompts: list[str], images: list[list] | None, device: str) -> dict[str, Any]:
        """The processor's two halves called apart: its text half expands <image> without the image (a page is
        always 5 x 64 tokens), and its image half takes uint8 tensors and runs on ``device`` (the GPU), where its
        __call__ only takes PIL images or URLs."""
        if not images or not any(images):
            return self.text_inputs(m, prompts)
        inputs = dict(self.processor(text=prompts, padding=True, return_tensors="pt"))
        inputs.update(self.processor.image_processor(images, return_tensors="pt", device=device))
        return self._on_device(m, inputs)

    @classmethod
    def render_edge(cls, processor_config: dict[str, Any], splitting: bool) -> int:
        """Idefics2 splits a page into 4 crops before resizing each to longest_edge (and never upscales), so a page
        rendered at twice longest_edge gives full-resolution crops."""
        longest = super().render_edge(processor_config, splitting)
        if processor_config.get("image_processor_type", "").startswith("Idefics2") and splitting:
            return 2 * longest
        return longest

    def max_image_rows(self, model) -> int:
        return model.config.perceiver_config.resampler_n_latents * self.crops_per_page()

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.processor(text=[prompt])["input_ids"][0])  # every page's prompt is as long

    def crops_per_page(self) -> int:
        return CROPS if self.splitting() else 1

    def encode_bytes_per_page(self, config, dtype_bytes: int) -> int:
        from docpipe.model.sizing import encode_bytes_per_page  # the perceiver's gated MLP dominates

        return encode_bytes_per_page(config, self.crops_per_page(), dtype_bytes)
