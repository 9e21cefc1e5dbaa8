"""Tiny random checkpoints of the families beside Idefics2 (``tiny-random`` is pipeline/model/tiny.py), built locally
and loaded through the real ``from_pretrained`` path, with tiny.py's recipe (its corpus, its weights' spread).

Each tiny checkpoint follows its published checkpoints' processor and tokenizer conventions, at smaller images:

- ``tiny-random-idefics3``: SmolVLM's (Idefics3Processor, ``<|im_start|>User:...<end_of_utterance>\\nAssistant:``),
  tiles of 112 px (8 x 8 patches of 14, pixel shuffle 2: 16 tokens a tile), pages resized to 224 px;
- ``tiny-random-granite-docling``: granite-docling-258M's: every DocTags tag a special token, turns ending with
  ``<|end_of_text|>``, and the ``<end_of_utterance>`` the Idefics3 processor adds lying one past the embedding;
  tiles of 256 px (16 x 16 patches, pixel shuffle 4: 16 tokens a tile), pages resized to 512 px;
- ``tiny-random-lighton``: LightOnOCR's (a Pixtral processor with ``<|image_pad|>``, ``<|vision_pad|>`` row breaks
  and ``<|vision_end|>``, ChatML turns ending with ``<|im_end|>``, the page image alone as the request), pages up to
  224 px (one token per 28 x 28 px).

Weights are drawn wide, as tiny-random's are (pipeline/model/tiny.py: INIT_RANGE), so texts differ page to page.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VERSION = 1  # bump when a recipe changes, so cached checkpoints are rebuilt

IDEFICS3_TEMPLATE = (  # SmolVLM-Instruct's turns
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
GRANITE_TEMPLATE = (  # granite-docling-258M's turns
    "{% for message in messages %}{{ '<|start_of_role|>' + message['role'] + '<|end_of_role|>' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{{ '<|end_of_text|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_of_role|>assistant<|end_of_role|>' }}{% endif %}"
)
LIGHTON_TEMPLATE = (  # LightOnOCR's ChatML turns (a system turn first, the image then any text)
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system<|im_end|>\n' }}{% endif %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<|image_pad|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] + '\n' }}{% endif %}{% endfor %}{{ '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# DocTags' element tags (opening and closing) and its single tokens, as granite-docling's tokenizer has them.
DOCTAGS_ELEMENTS = ["doctag", "text", "title", "caption", "footnote", "formula", "list_item", "page_footer",
                    "page_header", "picture", "otsl", "checkbox_selected", "checkbox_unselected", "form",
                    "key_value_region", "chart", "smiles", "paragraph", "references", "ordered_list",
                    "unordered_list", "group", "code"] + [f"section_header_level_{i}" for i in range(1, 7)]
DOCTAGS_SINGLES = ["<page_break>", "<fcel>", "<ecel>", "<lcel>", "<ucel>", "<xcel>", "<nl>", "<ched>", "<rhed>"]

KINDS: dict[str, dict[str, Any]] = {
    "tiny-random-idefics3": {"tile": 112, "patch": 14, "scale": 2, "grid": 6, "template": IDEFICS3_TEMPLATE},
    "tiny-random-granite-docling": {"tile": 256, "patch": 16, "scale": 4, "grid": 4, "template": GRANITE_TEMPLATE},
    "tiny-random-lighton": {"edge": 224, "patch": 14, "merge": 2, "template": LIGHTON_TEMPLATE},
}


def _tokenizer(corpus: str, specials: list[str], bos: str | None, eos: str, pad: str, unk: str | None,
               also_special: list[str] = ()):
    """A small byte-level BPE tokenizer (trained on tiny.py's corpus) with the given special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    base = [t for t in (unk, bos, eos, pad) if t]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(dict.fromkeys(base)), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
                                   padding_side="left", model_max_length=32768)
    fast.add_special_tokens({"additional_special_tokens": specials})
    if also_special:  # special (skipped by skip_special_tokens) but not "additional", as granite lists its tags
        from tokenizers import AddedToken

        fast.add_tokens([AddedToken(t, special=True, normalized=False) for t in also_special])
    return fast


def _idefics3_processor(kind: str, spec: dict[str, Any], corpus: str):
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    rows = [f"<row_{i}_col_{j}>" for i in range(1, spec["grid"] + 1) for j in range(1, spec["grid"] + 1)]
    if kind == "tiny-random-granite-docling":
        tags = [t for name in DOCTAGS_ELEMENTS for t in (f"<{name}>", f"</{name}>")] + DOCTAGS_SINGLES
        tokenizer = _tokenizer(corpus, ["<fake_token_around_image>", "<image>"], "<|start_of_role|>", "<|end_of_text|>",
                               "<|end_of_text|>", "<|unk|>",
                               also_special=["<|pad|>", "<|end_of_role|>", "<global-img>"] + rows + tags)
    else:
        tokenizer = _tokenizer(corpus, ["<fake_token_around_image>", "<image>", "<end_of_utterance>"], "<|im_start|>",
                               "<end_of_utterance>", "<|im_end|>", "<|endoftext|>", also_special=["<global-img>"] + rows)
    vocab = len(tokenizer)  # the model's: granite's <end_of_utterance>, added below by the processor, lies past it
    image = Idefics3ImageProcessor(size={"longest_edge": 2 * spec["tile"]}, max_image_size={"longest_edge": spec["tile"]},
                                   do_image_splitting=True)
    seq_len = (spec["tile"] // spec["patch"]) ** 2 // spec["scale"] ** 2
    return Idefics3Processor(image_processor=image, tokenizer=tokenizer, image_seq_len=seq_len,
                             chat_template=spec["template"]), vocab


def _lighton_processor(spec: dict[str, Any], corpus: str):
    from transformers import PixtralImageProcessor, PixtralProcessor

    tokenizer = _tokenizer(corpus, ["<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|vision_pad|>", "<|vision_end|>"],
                           None, "<|im_end|>", "<|endoftext|>", None)
    image = PixtralImageProcessor(size={"longest_edge": spec["edge"]}, patch_size=spec["patch"],
                                  image_mean=[0.48145466, 0.4578275, 0.40821073],
                                  image_std=[0.26862954, 0.26130258, 0.27577711])
    processor = PixtralProcessor(image_processor=image, tokenizer=tokenizer, patch_size=spec["patch"],
                                 spatial_merge_size=spec["merge"], chat_template=spec["template"],
                                 image_token="<|image_pad|>", image_break_token="<|vision_pad|>",
                                 image_end_token="<|vision_end|>")
    return processor, len(tokenizer)


def build(kind: str, dest: Path, corpus: str, init: float, stop_scale: float, seed: int = 0) -> None:
    """Build the tiny checkpoint ``kind`` into ``dest``, with tiny.py's recipe: the tokenizers' ``corpus``, the
    weights' spread ``init`` and the end-of-turn row's ``stop_scale``."""
    import torch

    spec = KINDS[kind]
    if kind == "tiny-random-lighton":
        processor, vocab = _lighton_processor(spec, corpus)
        config = _lighton_config(processor.tokenizer, vocab, spec, init)
    else:
        processor, vocab = _idefics3_processor(kind, spec, corpus)
        config = _idefics3_config(processor.tokenizer, vocab, spec, init)
    torch.manual_seed(seed)
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_config(config).eval()
    from docpipe.model.families import family_of

    family = family_of(model, processor)
    shape_output_layer(model, processor.tokenizer, family.end_of_turn(), stop_scale)
    tok = processor.tokenizer
    gen = model.generation_config
    gen.bos_token_id, gen.pad_token_id = tok.bos_token_id, tok.pad_token_id
    gen.eos_token_id = sorted({tok.eos_token_id, tok.convert_tokens_to_ids(family.end_of_turn())})
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    if not (dest / "config.json").exists():  # rank != 0 of torch.distributed: transformers saved no model
        raise RuntimeError("the tiny checkpoint must be built outside a torch.distributed worker of rank > 0")
    (dest / "docpipe_tiny.json").write_text(json.dumps({"tiny_version": VERSION, "kind": kind, "seed": seed}))


def _text_config(model_type: str, tokenizer, vocab: int, init: float, **extra) -> dict[str, Any]:
    return {"model_type": model_type, "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "max_position_embeddings": 4096, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "initializer_range": init, **extra}


def _idefics3_config(tokenizer, vocab: int, spec: dict[str, Any], init: float):
    from transformers import Idefics3Config

    return Idefics3Config(
        text_config=_text_config("llama", tokenizer, vocab, init),
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": spec["tile"], "patch_size": spec["patch"], "initializer_range": init},
        scale_factor=spec["scale"], image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False, initializer_range=init)


def _lighton_config(tokenizer, vocab: int, spec: dict[str, Any], init: float):
    from transformers import LightOnOcrConfig

    return LightOnOcrConfig(
        text_config=_text_config("qwen3", tokenizer, vocab, init, tie_word_embeddings=False),
        vision_config={"model_type": "pixtral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "head_dim": 16, "image_size": spec["edge"],
                       "patch_size": spec["patch"], "initializer_range": init},
        spatial_merge_size=spec["merge"], image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        tie_word_embeddings=False)


def shape_output_layer(model, tokenizer, stop: str, scale: float) -> None:
    """Unprintable tokens (byte pieces of the byte-level BPE) get a zero output row, so a printable token wins; the
    end-of-turn row ``stop`` is scaled by ``scale``, so that some pages end on their own."""
    import torch

    special = set(tokenizer.all_special_ids) | {i for t, i in tokenizer.get_added_vocab().items()}
    weight = model.lm_head.weight
    with torch.no_grad():
        for token_id in range(weight.shape[0]):
            text = tokenizer.decode([token_id])
            if token_id not in special and not (text.isprintable() and text.isascii()):
                weight[token_id] = 0
        weight[tokenizer.convert_tokens_to_ids(stop)] *= scale
