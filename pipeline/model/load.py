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


def resolve_checkpoint(name: str, revision: str | None = None) -> str:
    """A local folder for ``from_pretrained``, or a hub id that is in the local cache or can be downloaded. Tiny
    models ('tiny-random', 'tiny-random-idefics3', ...) are built locally once and cached; a preset ('idefics2-8b',
    'granite-docling-258m', ...) names its hub checkpoint. Fails fast, in one line, on a folder that isn't there, a
    checkpoint that can't be downloaded here (offline) and an architecture docpipe does not run."""
    from docpipe.model.families.presets import PRESETS
    from docpipe.model.tiny import TINY_MODELS

    if name.startswith(RANDOM_PREFIX):
        from docpipe.model.tiny import random_checkpoint

        return str(random_checkpoint(name[len(RANDOM_PREFIX) :]))  # same processor configuration as the model's
    if name in TINY_MODELS:
        from docpipe.model.tiny import ensure_tiny_checkpoint

        return str(ensure_tiny_checkpoint(kind=name))
    preset = PRESETS.get(name.lower())
    repo = preset.repo if preset else name
    label = f"{name} ({repo})" if preset else repo
    local = Path(repo).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"model folder {repo} has no config.json: not a transformers checkpoint")
        checkpoint = str(local)
    elif repo.startswith((".", "/", "~")) or repo.count("/") != 1 or repo.endswith("/"):
        raise ModelLoadError(f"model {repo}: no such folder (and not a hub id: those are ORG/NAME)")
    else:
        checkpoint = repo
        _hub_available(repo, label, revision)
    check_architecture(checkpoint, label)
    return checkpoint


def _hub_available(repo: str, label: str, revision: str | None) -> None:
    """The checkpoint is in the local Hugging Face cache, or the hub answers for it: one request, no retries (the
    hub client retries a dead network for about 25 s a file, and loading reads several)."""
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo, "config.json", revision=revision), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(f"model {label} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: it "
                             "cannot be downloaded here (download it where there is a network, or give a local folder)")
    from huggingface_hub import hf_hub_download, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session

    try:
        reply = get_session().head(hf_hub_url(repo, "config.json", revision=revision), headers=build_hf_headers(),
                                   follow_redirects=True, timeout=10)
    except Exception as exc:
        raise ModelLoadError(f"model {label} is not in the local Hugging Face cache and the hub can't be reached to "
                             f"download it ({describe(exc)}); offline, set HF_HUB_OFFLINE=1 and use a cached model or "
                             "a local folder") from None
    if reply.status_code in (401, 403, 404):
        raise ModelLoadError(f"model {label}: no such checkpoint on the Hugging Face hub, or it is gated or private "
                             f"(HTTP {reply.status_code}; log in with `hf auth login` for a gated one)")
    try:
        hf_hub_download(repo, "config.json", revision=revision)  # the architecture check reads it
    except Exception as exc:
        raise ModelLoadError(f"cannot download model {label}: {describe(exc)}") from None


def check_architecture(checkpoint: str, label: str | None = None):
    """The family class of a checkpoint (its config.json read from the folder or the cache); a one-line error for
    an architecture docpipe does not run. None when the config isn't here (from_pretrained will say why)."""
    from docpipe.model.families import UnsupportedArchitecture, checkpoint_config, family_class

    config = checkpoint_config(checkpoint)
    if config is None:
        return None
    try:
        return family_class(config, f"model {label or checkpoint}")
    except UnsupportedArchitecture as exc:
        raise ModelLoadError(str(exc)) from None


def family_for_checkpoint(checkpoint: str, opts: ModelOptions | None = None):
    """The family of a checkpoint bound to its processor, without loading the model (its prompts, output format)."""
    from transformers import AutoProcessor

    from docpipe.model.families.idefics2 import Idefics2

    family = check_architecture(checkpoint) or Idefics2
    kwargs = {"revision": opts.revision, "trust_remote_code": opts.trust_remote_code} if opts else {}
    try:
        return family(AutoProcessor.from_pretrained(checkpoint, **kwargs))
    except Exception as exc:
        raise ModelLoadError(f"cannot load the processor of {checkpoint}: {describe(exc)}") from None


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
    """Longest page side the model's processor makes full use of, as its family reads the processor's
    configuration (Idefics2 with splitting: twice its longest_edge; Idefics3: the size it tiles; LightOnOCR: its
    longest_edge)."""
    from docpipe.model.families.idefics2 import Idefics2

    config = _image_processor_config(checkpoint, opts)
    family = check_architecture(checkpoint) or Idefics2
    return family.render_edge(config, image_splitting(opts, config))


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
    family: Any = None  # its docpipe.model.families.Family, bound to the processor (set by load_model)

    def __post_init__(self):
        if self.family is None:
            from docpipe.model.families import family_of

            self.family = family_of(self.model, self.processor)


def load_model(opts: ModelOptions, checkpoint: str | None = None) -> LoadedModel:
    """Load through the Auto classes, so every family (pipeline/model/families/) loads the same way."""
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
            checkpoint = checkpoint or resolve_checkpoint(opts.name, opts.revision)
            family = check_architecture(checkpoint, opts.name)
            processor = AutoProcessor.from_pretrained(checkpoint, **common)
            quant = quantization_config(opts, dtype, family.vision_modules if family else None)
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
        from docpipe.model.families import family_of

        family = family_of(model, processor)
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
    return LoadedModel(model, processor, device, dtype, attention, opts.name, family)


def model_options(opts: ModelOptions, family) -> ModelOptions:
    """The options as the model runs them: what the user left unset taken from the model's preset and family (the
    OCR prompt: DocTags models answer "Convert this page to docling.", LightOnOCR takes the page alone; the token
    budget: a page of DocTags is long). Idefics2's are ModelOptions' defaults."""
    from docpipe.model.families.presets import PRESETS

    preset = PRESETS.get(opts.name.lower())
    update: dict[str, Any] = {}
    if "prompt" not in opts.model_fields_set:
        update["prompt"] = preset.prompt if preset and preset.prompt is not None else family.ocr_prompt
    if "max_new_tokens" not in opts.model_fields_set:
        budget = (preset.max_new_tokens if preset else None) or family.max_new_tokens()
        if budget:
            update["max_new_tokens"] = budget
    update = {k: v for k, v in update.items() if getattr(opts, k) != v}
    return opts.model_copy(update=update) if update else opts


def chat_prompt(processor, images: int, text: str, answer: str | None = None) -> str:
    """The prompt as the model sees it: a user turn of ``images`` images then the instruction, and the
    assistant's cue. With ``answer``, the whole exchange, as fine-tuning learns it. One function for
    inference and training, so both see exactly the same prompt (pipeline/model/families/base.py)."""
    from docpipe.model.families.base import Family

    return Family(processor).chat_prompt(images, text, answer)


def stop_and_pad_ids(loaded: LoadedModel) -> tuple[list[int], int]:
    """Tokens that end an answer (the model's eos ids and its chat template's end of turn), and the pad id."""
    return loaded.family.stop_and_pad_ids(loaded.model)


def quantization_config(opts: ModelOptions, dtype, vision_modules=None):
    if opts.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    # The vision tower and connector stay in dtype: a small share of the weights, most of the encoding's compute,
    # and the image features the text model reads (lm_head too: transformers' own default).
    skip = [*(vision_modules or ("vision_model", "connector")), "lm_head"]
    if opts.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=skip,
    )
