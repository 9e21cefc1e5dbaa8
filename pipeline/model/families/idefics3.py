"""Idefics3 (Idefics3-8B, SmolVLM, SmolDocling, granite-docling-258M): a pixel-shuffle connector, and a page cut
into a grid of square tiles plus the whole page, so a page's prompt, and its count of image tokens, depend on its
shape (64 to 169 tokens a tile, up to 16 tiles). The processor builds the prompt from the image itself.

Two flavours share the architecture, told apart by the tokenizer: DocTags writers (SmolDocling, granite-docling:
``<doctag>`` is one of their tokens, every tag a special token) answer "Convert this page to docling." with DocTags,
which docling-core parses into our Markdown and the page's blocks (pipeline/model/families/doctags.py); the others
(Idefics3-8B, SmolVLM) follow instructions and write Markdown as Idefics2 does.
"""

from __future__ import annotations

import math
from typing import Any

from docpipe.model.families.base import Family

DOCTAGS_PROMPT = "Convert this page to docling."  # SmolDocling's and granite-docling's own instruction
DOCTAGS_MAX_NEW_TOKENS = 8192  # docling's budget for a page of DocTags (a dense page's boxes and tables are long)


class Idefics3(Family):
    name = "Idefics3"
    architectures = ("Idefics3ForConditionalGeneration",)
    model_types = ("idefics3",)

    @property
    def output(self) -> str:
        tokenizer = self.processor.tokenizer
        doctag = tokenizer.convert_tokens_to_ids("<doctag>")
        return "doctags" if isinstance(doctag, int) and doctag != tokenizer.unk_token_id else "markdown"

    @property
    def follows_instructions(self) -> bool:
        return self.output != "doctags"  # trained on "Convert this page to docling." and element questions only

    @property
    def ocr_prompt(self) -> str:
        return DOCTAGS_PROMPT if self.output == "doctags" else super().ocr_prompt

    def max_new_tokens(self) -> int | None:
        return DOCTAGS_MAX_NEW_TOKENS if self.output == "doctags" else None

    @classmethod
    def render_edge(cls, processor_config: dict[str, Any], splitting: bool) -> int:
        """The processor resizes a page to size.longest_edge and cuts it into max_image_size tiles (with splitting),
        or resizes it to one tile (without)."""
        if not splitting:
            return int((processor_config.get("max_image_size") or {}).get("longest_edge", 364))
        return super().render_edge(processor_config, splitting)

    def crops_per_page(self) -> int:
        if not self.splitting():
            return 1
        config = self.processor.image_processor
        side = math.ceil(config.size["longest_edge"] / config.max_image_size["longest_edge"])
        return side * side + 1  # the tiles of a square page, and the whole page

    def decode(self, tokens: list[int]) -> str:
        """DocTags keep their tags (special tokens): only the tokenizer's own specials (end of text, padding, image
        placeholders) are dropped."""
        if self.output != "doctags":
            return super().decode(tokens)
        tokenizer = self.processor.tokenizer
        text = tokenizer.decode(tokens, skip_special_tokens=False)
        # not all_special_tokens: a tokenizer may list the DocTags tags among its additional special tokens
        for special in {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token,
                        "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>"} - {None}:
            text = text.replace(special, "")
        return text.strip()

    def page_output(self, raw: str):
        if self.output != "doctags":
            return raw, None
        from docpipe.model.families.doctags import doctags_page

        return doctags_page(raw)
