"""Load the vision-language model and its processor; pick device, dtype and attention.

torch and transformers are imported inside functions: the driver, the CLI and the
CPU stages don't pay for them.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from docpipe.config import TINY_MODEL, ModelOptions
from docpipe.errors import ModelLoadError, describe


RANDOM_PREFIX = "random:"  # "random:idefics2-8b": a shipped architecture with random weights (benchmarks)


def resolve_checkpoint(name: str) -> str:
    """A hub id or a local path for ``from_pretrained``; 'tiny-random' is built locally once and cached."""
    if name.startswith(RANDOM_PREFIX):
        from docpipe.model.tiny import ensure_tiny_checkpoint

        return str(ensure_tiny_checkpoint())  # same processor configuration as the random model's
    if name == TINY_MODEL:
        from docpipe.model.tiny import ensure_tiny_checkpoint

        return str(ensure_tiny_checkpoint())
    return name


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(opts: ModelOptions, device: str):
    import torch

    if opts.dtype != "auto":
        return getattr(torch, opts.dtype)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # bf16 matmuls on most CPUs are emulated and slow


def pick_attention(opts: ModelOptions, device: str) -> str:
    """Chosen here, once, and recorded: flash-attention 3 (the flash_attn_interface package, Hopper) or 2 when
    importable on a GPU, else sdpa. The continuous engine keeps this choice (transformers would otherwise switch it
    to flash on its own, unreported)."""
    if opts.attention != "auto":
        return opts.attention
    if device == "cuda" and importlib.util.find_spec("flash_attn_interface") is not None:
        return "flash_attention_3"
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def render_edge_for(checkpoint: str, opts: ModelOptions) -> int:
    """Longest page side the processor makes full use of.

    Idefics2 splits a page into 4 crops before resizing each to longest_edge (and never
    upscales), so a page rendered at twice longest_edge gives full-resolution crops.
    """
    config = _image_processor_config(checkpoint, opts)
    size = config.get("size") or {}
    longest = int(size.get("longest_edge") or max(size.get("height", 980), size.get("width", 980)))
    if config.get("image_processor_type", "").startswith("Idefics2") and image_splitting(opts, config):
        return 2 * longest
    return longest


def image_splitting(opts: ModelOptions, processor_config: dict[str, Any]) -> bool:
    """Whether pages are split into crops: the option when set, else the checkpoint's own setting. The one
    decision behind both the render size and the processor, so a page is never rendered for one and fed
    to the other."""
    if opts.do_image_splitting is not None:
        return opts.do_image_splitting
    return bool(processor_config.get("do_image_splitting", False))


def _image_processor_config(checkpoint: str, opts: ModelOptions) -> dict[str, Any]:
    import json

    local = Path(checkpoint)
    try:
        if local.is_dir():
            for name in ("preprocessor_config.json", "processor_config.json"):
                if (local / name).exists():
                    data = json.loads((local / name).read_text())
                    return data.get("image_processor", data)
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(
            checkpoint, revision=opts.revision, trust_remote_code=opts.trust_remote_code
        )
        return proc.to_dict()
    except Exception as exc:
        raise ModelLoadError(f"cannot read the image processor of {checkpoint}: {describe(exc)}") from None


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    device: str
    dtype: Any
    attention: str
    name: str  # as the user gave it, recorded in the pages rows


def load_model(opts: ModelOptions, checkpoint: str | None = None) -> LoadedModel:
    """Load through the Auto classes so Idefics2's successors (Idefics3, SmolVLM) load the same way."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = pick_device()
    dtype = pick_dtype(opts, device)
    attention = pick_attention(opts, device)
    if device == "cpu" and opts.cpu_threads:
        torch.set_num_threads(opts.cpu_threads)
    common = {"revision": opts.revision, "trust_remote_code": opts.trust_remote_code}
    try:
        if opts.name.startswith(RANDOM_PREFIX):
            from docpipe.model.tiny import build_random_model

            model, processor = build_random_model(opts.name[len(RANDOM_PREFIX) :], device, dtype, attention)
        else:
            checkpoint = checkpoint or resolve_checkpoint(opts.name)
            processor = AutoProcessor.from_pretrained(checkpoint, **common)
            quant = quantization_config(opts, dtype)
            model = AutoModelForImageTextToText.from_pretrained(
                checkpoint,
                dtype=dtype,
                attn_implementation=attention,
                # bitsandbytes places the weights itself; everything else is moved below.
                **({"quantization_config": quant, "device_map": {"": device}} if quant else {}),
                **common,
            )
            if not quant:
                model = model.to(device)
        if opts.adapter:
            from peft import PeftModel

            # Merged into the base weights: generation then runs at the base model's speed.
            model = PeftModel.from_pretrained(model, opts.adapter, **common).merge_and_unload()
    except Exception as exc:
        raise ModelLoadError(f"cannot load model {opts.name!r}: {describe(exc)}") from None
    processor.tokenizer.padding_side = "left"  # decoder-only generation appends on the right
    if hasattr(processor.image_processor, "do_image_splitting"):
        own = {"do_image_splitting": processor.image_processor.do_image_splitting}
        processor.image_processor.do_image_splitting = image_splitting(opts, own)
    model.eval()
    if opts.compile:
        model.forward = torch.compile(model.forward, dynamic=True)
    torch.set_grad_enabled(False)
    return LoadedModel(model, processor, device, dtype, attention, opts.name)


def chat_prompt(processor, images: int, text: str, answer: str | None = None) -> str:
    """The prompt as the model sees it: a user turn of ``images`` images then the instruction, and the
    assistant's cue. With ``answer``, the whole exchange, as fine-tuning learns it. One function for
    inference and training, so both see exactly the same prompt."""
    content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    if answer is None:
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return processor.apply_chat_template(messages, add_generation_prompt=False)


def stop_and_pad_ids(loaded: LoadedModel) -> tuple[list[int], int]:
    """Tokens that end an answer (the model's eos ids and Idefics2's <end_of_utterance>), and the pad id."""
    tokenizer = loaded.processor.tokenizer
    configured = loaded.model.generation_config.eos_token_id
    stop = set(configured if isinstance(configured, list) else [configured])
    eou = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    if isinstance(eou, int) and eou != tokenizer.unk_token_id:
        stop.add(eou)
    stop.add(tokenizer.eos_token_id)
    stop_ids = sorted(i for i in stop if i is not None)
    return stop_ids, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]


def quantization_config(opts: ModelOptions, dtype):
    if opts.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    # The vision tower and connector stay in dtype: a small share of the weights, most of the encoding's compute,
    # and the image features the text model reads (lm_head too: transformers' own default).
    skip = ["vision_model", "connector", "lm_head"]
    if opts.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=skip,
    )
