"""What every family answers, with the defaults most of them share (see the package docstring)."""

from __future__ import annotations

from typing import Any, ClassVar

from docpipe.config import OCR_PROMPT


class Family:
    name: ClassVar[str] = ""
    architectures: ClassVar[tuple[str, ...]] = ()
    model_types: ClassVar[tuple[str, ...]] = ()
    # The modules the vision side is made of (bitsandbytes leaves them unquantised; LoRA never adapts them), and
    # the decoder's attribute under model.model, whose layers LoRA adapts.
    vision_modules: ClassVar[tuple[str, ...]] = ("vision_model", "connector")
    # Whether the processor's text half expands a prompt's image placeholders without the image (Idefics2: a page
    # is always 5 x 64 tokens); the others build the prompt from the image.
    expands_without_images: ClassVar[bool] = False
    connector: ClassVar[str] = "connector"
    decoder: ClassVar[str] = "text_model"

    def __init__(self, processor=None):
        self.processor = processor

    # ------------------------------------------------------------------------------------------ what it writes
    @property
    def output(self) -> str:
        """'markdown' (our page format, or close to it) or 'doctags' (docling's markup with boxes)."""
        return "markdown"

    @property
    def follows_instructions(self) -> bool:
        """Whether the model follows a free instruction (extraction prompts); OCR-only models don't."""
        return True

    @property
    def ocr_prompt(self) -> str:
        """The instruction sent with each page when ModelOptions.prompt is not set."""
        return OCR_PROMPT

    def max_new_tokens(self) -> int | None:
        """A page's token budget when the options leave it to the model (None: ModelOptions' default)."""
        return None

    # ------------------------------------------------------------------------------------------ prompts
    def chat_prompt(self, images: int, text: str, answer: str | None = None) -> str:
        """A user turn of ``images`` images then the instruction (none when empty: OCR-only models take the image
        alone), and the assistant's cue; with ``answer``, the whole exchange, as fine-tuning learns it."""
        content = [{"type": "image"} for _ in range(images)] + ([{"type": "text", "text": text}] if text else [])
        messages = [{"role": "user", "content": content}]
        if answer is None:
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return self.processor.apply_chat_template(messages, add_generation_prompt=False)

    def end_of_turn(self) -> str:
        """The special token the chat template closes an answer with (Idefics2's <end_of_utterance>, granite's
        <|end_of_text|>, ChatML's <|im_end|>): read from the template itself, so a fine-tune of any checkpoint
        learns to stop as its template does."""
        marker = "\u2063docpipe\u2063"
        full = self.chat_prompt(0, "x", marker)
        rest = full[full.rindex(marker) + len(marker):]
        tokenizer = self.processor.tokenizer
        specials = sorted((t for t in tokenizer.get_added_vocab() if t and t in rest), key=rest.index)
        if not specials:
            raise ValueError("the chat template closes an answer with no special token")
        return specials[0]

    def stop_and_pad_ids(self, model) -> tuple[list[int], int]:
        """Tokens that end an answer (the generation config's eos ids, the tokenizer's eos and the template's end of
        turn), each one the model can emit, and the pad id. granite-docling's <end_of_utterance> (added by the
        Idefics3 processor, never used by its template) lies past its output layer: it is left out."""
        tokenizer = self.processor.tokenizer
        configured = model.generation_config.eos_token_id
        stop = set(configured if isinstance(configured, list) else [configured])
        turn = tokenizer.convert_tokens_to_ids(self.end_of_turn())
        if isinstance(turn, int) and turn != tokenizer.unk_token_id:
            stop.add(turn)
        stop.add(tokenizer.eos_token_id)
        rows = model.get_output_embeddings().weight.shape[0]
        stop_ids = sorted(i for i in stop if i is not None and 0 <= i < rows)
        return stop_ids, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]

    def never_learned(self) -> set[int]:
        """Token ids a fine-tune must never be taught to write (the image placeholders)."""
        tokenizer = self.processor.tokenizer
        names = [getattr(self.processor, a, None) for a in ("image_token", "fake_image_token", "global_image_tag",
                                                             "image_break_token", "image_end_token")]
        ids = {tokenizer.convert_tokens_to_ids(n) for n in names if isinstance(n, str)}
        return {i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id}

    # ------------------------------------------------------------------------------------------ inputs
    def model_inputs(self, m, prompts: list[str], images: list[list] | None, device: str) -> dict[str, Any]:
        """Processor output for prompts and their page images (uint8 (3, H, W) tensors), on the model's device.
        The processor builds each prompt from its images (Idefics3's tile grid, LightOnOCR's patch rows depend on
        the page's shape); the image half runs on ``device``."""
        if not images or not any(images):
            return self.text_inputs(m, prompts)
        inputs = dict(self.processor(text=prompts, images=images, padding=True, return_tensors="pt",
                                     device=device))
        return self._on_device(m, inputs)

    def text_inputs(self, m, prompts: list[str]) -> dict[str, Any]:
        """Token ids alone, for prompts without images (text-to-JSON), with the special tokens the processor adds."""
        inputs = dict(self.processor(text=prompts, padding=True, return_tensors="pt"))
        return {k: v.to(m.device) for k, v in inputs.items()}

    @staticmethod
    def _on_device(m, inputs: dict[str, Any]) -> dict[str, Any]:
        inputs = {k: v.to(m.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(m.dtype)
        return inputs

    def image_features(self, model, inputs: dict[str, Any], part: slice):
        """The vision tower and connector over the pages ``part`` of a batch: ``get_image_features``'s pooled
        output, in the pages' order (pipeline/model/continuous.py splits it per page)."""
        mask = inputs.get("pixel_attention_mask")
        return model.get_image_features(pixel_values=inputs["pixel_values"][part],
                                        pixel_attention_mask=None if mask is None else mask[part]).pooler_output

    def text_model(self, model):
        """The decoder that reads the image features (without lm_head): the continuous engine's shell shares it."""
        return getattr(model.model, self.decoder)

    @staticmethod
    def image_token_id(model) -> int:
        return model.config.image_token_id

    # ------------------------------------------------------------------------------------------ sizes
    @classmethod
    def render_edge(cls, processor_config: dict[str, Any], splitting: bool) -> int:
        """Longest page side the processor makes full use of (rendering larger is wasted, smaller loses detail)."""
        size = processor_config.get("size") or {}
        return int(size.get("longest_edge") or max(size.get("height", 980), size.get("width", 980)))

    def largest_page(self) -> tuple[int, int]:
        """(height, width) of the page that costs the most image tokens: a square at the processor's size."""
        edge = self.render_edge(self.processor.image_processor.to_dict(), self.splitting())
        return edge, edge

    def splitting(self) -> bool:
        return bool(getattr(self.processor.image_processor, "do_image_splitting", False))

    def max_image_rows(self, model) -> int:
        """Most image-token positions (feature rows) one page can take: the feature bank's rows per page."""
        import torch

        h, w = self.largest_page()
        page = torch.full((3, h, w), 255, dtype=torch.uint8)
        ids = self.processor(text=[self.chat_prompt(1, "")], images=[[page]], return_tensors="pt")["input_ids"][0]
        return int((ids == self.image_token_id(model)).sum())

    def prompt_tokens(self, prompt: str) -> int:
        """Tokens of the page prompt at its longest (the largest page): what the KV cache is sized for."""
        import torch

        h, w = self.largest_page()
        page = torch.full((3, h, w), 255, dtype=torch.uint8)
        return len(self.processor(text=[prompt], images=[[page]], return_tensors="pt")["input_ids"][0])

    def crops_per_page(self) -> int:
        """Most images the vision tower encodes for one page (tiles and the whole page)."""
        return 1

    def encode_bytes_per_page(self, config, dtype_bytes: int) -> int:
        """Peak activation memory of encoding one page at its largest: per crop, the vision tower's MLP and a few
        hidden-state copies over every patch, and the connector's output (attention scores are not counted: a
        memory-efficient kernel never materialises them)."""
        vision = config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        per_patch = 2 * config.text_config.hidden_size + vision.intermediate_size + 4 * vision.hidden_size
        return self.crops_per_page() * patches * per_patch * dtype_bytes

    # ------------------------------------------------------------------------------------------ output
    def decode(self, tokens: list[int]) -> str:
        """The answer's tokens (stop token excluded) as the model's raw text."""
        return self.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def page_output(self, raw: str) -> tuple[str, list[dict[str, Any]] | None]:
        """The page's Markdown, and its layout blocks when the model gives boxes (else None)."""
        return raw, None
