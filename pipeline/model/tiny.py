"""Build tiny, random checkpoints locally (no hub access needed), one per model family.

``tiny-random`` is Idefics2: the real model's processor, chat template, special tokens, image sizes and image
splitting, so everything around the model behaves as with idefics2-8b; only the weights are random, so its text
is meaningless. Used by tests and CPU demos. The other families' (``TINY_MODELS``) follow their published
checkpoints' processors and tokenizer conventions at smaller image sizes (pipeline/model/families/tiny.py).

The weights are drawn wide (``INIT_RANGE``) so that the model is image-sensitive: different
pages give different greedy texts, deterministically, and a test can tell a page that got
another page's text (or no image at all) from a right one. At the usual 0.02 every page gave
the same text.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

# Bump when the recipe changes, so cached checkpoints are rebuilt.
TINY_VERSION = 2
# Weight init std for the text, vision and perceiver parts. Measured over 13 demo pages: 13 distinct texts
# at 0.5, one text for all at 0.02 (image features too small to move the text model).
INIT_RANGE = 0.5
# Scale of <end_of_utterance>'s output row: at 1.5 pages stop on their own after 7 to 13 tokens or run to
# the cap, so both finish reasons occur (at 1.0, 4 of 13 pages stopped within 16 tokens).
EOU_SCALE = 1.5

# Copied from HuggingFaceM4/idefics2-8b's processor configuration.
IDEFICS2_CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SPECIAL_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
IMAGE_SEQ_LEN = 64  # perceiver latents per image, as in idefics2-8b

_CORPUS = """
Invoice Receipt Total Subtotal Tax Date Due Amount Quantity Price Description Item Number Customer
Vendor Address Phone Email Page Table Report Summary Section Chapter Figure Notes Account Balance
The quick brown fox jumps over the lazy dog. Transcribe all the text on this page, in reading order.
Render tables as Markdown tables. Return only the transcription. | --- | 0 1 2 3 4 5 6 7 8 9 $ % , . :
{"key": "value", "items": [1, 2.5, true, false, null]} User Assistant
"""


TINY_MODELS = ("tiny-random", "tiny-random-idefics3", "tiny-random-granite-docling", "tiny-random-lighton")


def default_cache_dir(kind: str = "tiny-random") -> Path:
    root = os.environ.get("DOCPIPE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "docpipe")
    if kind == "tiny-random":
        return Path(root) / "models" / f"tiny-random-idefics2-v{TINY_VERSION}"
    from docpipe.model.families.tiny import VERSION

    return Path(root) / "models" / f"{kind}-v{VERSION}"


def ensure_tiny_checkpoint(path: Path | None = None, kind: str = "tiny-random") -> Path:
    """Return the tiny checkpoint's folder (``kind``: one of TINY_MODELS), building it once. Safe to call from
    several processes."""
    if kind not in TINY_MODELS:
        raise ValueError(f"no tiny model {kind!r}; known: {', '.join(TINY_MODELS)}")

    def build(tmp: Path) -> None:
        if kind == "tiny-random":
            build_tiny_checkpoint(tmp)
        else:
            from docpipe.model.families.tiny import build

            build(kind, tmp, _CORPUS, INIT_RANGE, EOU_SCALE)

    return _build_once(Path(path) if path else default_cache_dir(kind), build)


def _build_once(path: Path, build) -> Path:
    """``path``, made by ``build(folder)`` unless it is there."""
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    # One builder at a time (Ray Train's workers, test workers and the driver may all ask at once): the others
    # wait on the lock, then find the checkpoint. Built beside the target and renamed, so a reader that does not
    # take the lock never sees a half-written checkpoint.
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (path / "config.json").exists():
            return path
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=path.parent))
        try:
            build(tmp)
            os.rename(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def build_tokenizer():
    """A small byte-level BPE tokenizer with Idefics2's special tokens and conventions."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>"],  # ids 0, 1, 2 as in the Llama/Mistral vocabulary
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",  # idefics2-8b pads with <unk>
        padding_side="left",
        model_max_length=32768,
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    return fast


def build_processor():
    """An Idefics2Processor configured as idefics2-8b's, around the small local tokenizer."""
    from transformers import Idefics2ImageProcessor, Idefics2Processor

    image_processor = Idefics2ImageProcessor(
        do_image_splitting=True, size={"longest_edge": 980, "shortest_edge": 378}
    )
    return Idefics2Processor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=IDEFICS2_CHAT_TEMPLATE,
    )


def build_tiny_checkpoint(dest: Path, seed: int = 0) -> None:
    import torch
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration

    processor = build_processor()
    tokenizer = processor.tokenizer
    vocab = len(tokenizer)
    config = Idefics2Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": vocab,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "initializer_range": INIT_RANGE,
        },
        # The real vision tower's geometry (980 px, 14 px patches), far fewer channels and layers.
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 980,
            "patch_size": 14,
            "initializer_range": INIT_RANGE,
        },
        perceiver_config={
            "hidden_size": 64,
            "rms_norm_eps": 1e-5,
            "resampler_n_latents": IMAGE_SEQ_LEN,
            "resampler_depth": 1,
            "resampler_n_heads": 2,
            "resampler_head_dim": 16,
            "num_key_value_heads": 1,
            "initializer_range": INIT_RANGE,
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
        initializer_range=INIT_RANGE,
    )
    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(config).eval()
    shape_output_layer(model, tokenizer)
    set_generation_tokens(model, tokenizer)
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    if not (dest / "config.json").exists():  # rank != 0 of torch.distributed: transformers saved no model
        raise RuntimeError("the tiny checkpoint must be built outside a torch.distributed worker of rank > 0")
    (dest / "docpipe_tiny.json").write_text(json.dumps({"tiny_version": TINY_VERSION, "seed": seed}))


def shape_output_layer(model, tokenizer) -> None:
    """Readable, sometimes-ending output: tokens that decode to unprintable or non-ASCII text (byte pieces
    of the byte-level BPE) get a zero output row, so their logit is 0 and a printable token wins; the
    end-of-utterance row is scaled so that some pages end on their own."""
    from docpipe.model.families.tiny import shape_output_layer

    shape_output_layer(model, tokenizer, "<end_of_utterance>", EOU_SCALE)


def set_generation_tokens(model, tokenizer) -> None:
    gen = model.generation_config
    gen.bos_token_id = tokenizer.bos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    gen.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_utterance>")]


def shipped_architecture(arch: str) -> dict:
    """A shipped architecture's config (``pipeline/model/assets/<arch>.json``)."""
    asset = Path(__file__).parent / "assets" / f"{arch}.json"
    if not asset.exists():
        known = sorted(p.stem for p in asset.parent.glob("*.json"))
        raise ValueError(f"no shipped architecture {arch!r}; known: {', '.join(known)}")
    return json.loads(asset.read_text())


def random_checkpoint(arch: str) -> Path:
    """The folder whose processor a random-weight model of ``arch`` runs with: tiny-random's for Idefics2 (the real
    processor setup), else the tiny checkpoint's tokenizer with the real image geometry (families/tiny.py)."""
    spec = shipped_architecture(arch)
    if spec.get("model_type") == "idefics2":
        return ensure_tiny_checkpoint()
    return ensure_random_checkpoint(arch, spec)


def build_random_model(arch: str, device: str, dtype, attention: str):
    """A model of a shipped architecture (``pipeline/model/assets/<arch>.json``) with random weights, built
    directly on ``device``, with the local processor. For benchmarks where real weights can't be downloaded."""
    import torch
    from transformers import (AutoConfig, AutoModelForImageTextToText, AutoProcessor, Idefics2Config,
                              Idefics2ForConditionalGeneration)

    spec = shipped_architecture(arch)
    if spec.get("model_type") == "idefics2":
        processor = build_processor()
        spec = {k: v for k, v in spec.items() if not k.startswith("_") and k != "model_type"}
        spec["image_token_id"] = processor.tokenizer.convert_tokens_to_ids("<image>")
        config = Idefics2Config(**spec)
    else:
        folder = random_checkpoint(arch)
        processor = AutoProcessor.from_pretrained(folder)
        config = AutoConfig.from_pretrained(folder)
    config._attn_implementation = attention
    # Created in dtype on the device: float32 first, then cast, took 33.6 GB (50 GB at its peak) for idefics2-8b.
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            idefics2 = isinstance(config, Idefics2Config)
            model = (Idefics2ForConditionalGeneration(config) if idefics2
                     else AutoModelForImageTextToText.from_config(config)).eval()
    finally:
        torch.set_default_dtype(default)
    if idefics2:
        set_generation_tokens(model, processor.tokenizer)
    else:
        from docpipe.model.families import family_of

        tok = processor.tokenizer
        turn = family_of(model, processor).end_of_turn()
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = sorted({tok.eos_token_id, tok.convert_tokens_to_ids(turn)})
    return model, processor


def ensure_random_checkpoint(arch: str, spec: dict) -> Path:
    """A processor-only folder for a shipped architecture of the families beside Idefics2: the tiny checkpoint's
    tokenizer with the real checkpoint's image geometry (``spec["_processor"]``), and the architecture as
    config.json (no weights: ``build_random_model`` makes them). What sizing, render size and --gpu-check read."""
    from docpipe.model.families.tiny import VERSION

    def build(tmp: Path) -> None:
        from transformers import AutoProcessor

        settings = spec["_processor"]
        processor = AutoProcessor.from_pretrained(ensure_tiny_checkpoint(kind=settings["tokenizer"]))
        for key, value in settings.get("image_processor", {}).items():
            setattr(processor.image_processor, key, value)
        if "image_seq_len" in settings:
            processor.image_seq_len = settings["image_seq_len"]
        processor.save_pretrained(tmp)
        config = {k: v for k, v in spec.items() if not k.startswith("_")}
        config["image_token_id"] = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))

    return _build_once(default_cache_dir().parent / f"random-{arch}-v{VERSION}", build)
