import json

import pytest

from docpipe.config import ModelOptions, RenderOptions
from docpipe.render.document import expand_document
from docpipe.model.load import pick_attention, pick_dtype, render_edge_for
from docpipe.ocr import OcrStage
from docpipe.model.tiny import IDEFICS2_CHAT_TEMPLATE, IMAGE_SEQ_LEN


def test_tiny_checkpoint_has_the_real_processor_setup(tiny_checkpoint, tiny_model):
    proc = tiny_model.processor
    assert type(proc).__name__ == "Idefics2Processor"
    assert type(tiny_model.model).__name__ == "Idefics2ForConditionalGeneration"
    assert proc.image_processor.do_image_splitting is True
    assert proc.image_processor.size["longest_edge"] == 980
    assert proc.image_seq_len == IMAGE_SEQ_LEN == tiny_model.model.config.perceiver_config.resampler_n_latents
    assert proc.chat_template == IDEFICS2_CHAT_TEMPLATE
    tok = proc.tokenizer
    for special in ("<fake_token_around_image>", "<image>", "<end_of_utterance>"):
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id
    assert tok.padding_side == "left"
    assert json.loads((tiny_checkpoint / "config.json").read_text())["model_type"] == "idefics2"


def test_render_size_comes_from_the_processor(tiny_checkpoint):
    assert render_edge_for(str(tiny_checkpoint), ModelOptions()) == 1960  # the checkpoint's own: splitting on
    assert render_edge_for(str(tiny_checkpoint), ModelOptions(do_image_splitting=False)) == 980


def test_cpu_defaults():
    import torch

    opts = ModelOptions()
    assert pick_dtype(opts, "cpu") == torch.float32
    assert pick_attention(opts, "cpu") == "sdpa"
    assert pick_attention(ModelOptions(attention="eager"), "cuda") == "eager"


def _pages(path, n=None):
    recs = list(expand_document(str(path), RenderOptions(), 1960))
    return [r for r in recs if r["kind"] == "page"][:n]


def test_each_page_reaches_the_model_as_five_images(tiny_model, sample_docs):
    """Capture what generate() feeds the model: 5 images per page and 5 x 64 image tokens in the prompt."""
    stage = OcrStage(ModelOptions(name="tiny-random", max_new_tokens=2), loaded=tiny_model)
    images, prompts = [], []

    def vision_hook(module, args, kwargs):
        images.append(kwargs["pixel_values"].shape)

    def model_hook(module, args, kwargs):
        if not prompts:  # the first forward carries the whole prompt
            prompts.append(kwargs["input_ids"].clone())

    handles = [
        tiny_model.model.model.vision_model.register_forward_pre_hook(vision_hook, with_kwargs=True),
        tiny_model.model.register_forward_pre_hook(model_hook, with_kwargs=True),
    ]
    try:
        out = stage(_pages(sample_docs / "report.pdf", 2))
    finally:
        for h in handles:
            h.remove()
    assert [r["status"] for r in out] == ["ok", "ok"]
    # 2 pages x 5 images (4 crops + the whole page), each crop of a 1960 px page at the full 980 px.
    assert len(images) == 1 and images[0][0] == 10 and images[0][1] == 3 and max(images[0][2:]) == 980
    input_ids = prompts[0]
    tok = tiny_model.processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    fake_id = tok.convert_tokens_to_ids("<fake_token_around_image>")
    for row in input_ids.tolist():
        assert row.count(image_id) == 5 * IMAGE_SEQ_LEN
        assert row.count(fake_id) == 6  # one before each image and one after the last


def test_stage_outputs_and_passthrough(tiny_model, sample_docs):
    stage = OcrStage(ModelOptions(name="tiny-random", max_new_tokens=5), loaded=tiny_model)
    pages = _pages(sample_docs / "report.pdf", 2)
    failed = {**pages[0], "page_number": 9, "status": "error", "error_type": "render_error", "image": None}
    document = {"kind": "document", "source_uri": "x", "status": "ok", "page_count": 2}
    out = stage(pages + [failed, document])
    by_page = {(r["kind"], r.get("page_number")): r for r in out}
    assert len(out) == 4
    for n in (1, 2):
        r = by_page[("page", n)]
        assert r["status"] == "ok" and isinstance(r["text"], str) and r["model"] == "tiny-random"
        assert 1 <= r["output_tokens"] <= 5 and r["finish_reason"] in ("stop", "length")
        assert (r["finish_reason"] == "length") == (r["output_tokens"] == 5)
        assert "image" not in r
    assert by_page[("page", 9)]["error_type"] == "render_error" and by_page[("page", 9)].get("text") is None
    assert by_page[("document", None)] == document


def test_greedy_output_does_not_depend_on_batch_mates(tiny_model, sample_docs):
    """Left padding: a page's text is the same alone or batched with a page of another size."""
    stage = OcrStage(ModelOptions(name="tiny-random", max_new_tokens=4), loaded=tiny_model)
    scan = _pages(sample_docs / "scan.jpg")
    receipt = _pages(sample_docs / "receipt.png")
    alone = stage(scan)[0]["text"]
    together = {r["source_uri"]: r["text"] for r in stage(scan + receipt)}
    assert together[scan[0]["source_uri"]] == alone


def test_a_bad_page_image_fails_alone(tiny_model, sample_docs):
    stage = OcrStage(ModelOptions(name="tiny-random", max_new_tokens=2), loaded=tiny_model)
    good = _pages(sample_docs / "receipt.png")
    bad = {**good[0], "page_number": 2, "image": b"not an image"}
    out = {r["page_number"]: r for r in stage(good + [bad])}
    assert out[1]["status"] == "ok"
    assert out[2]["status"] == "error" and out[2]["error_type"] == "image_decode_error"


class _FailsOnPage(OcrStage):
    """The real stage, made to fail whenever a batch contains one chosen page."""

    calls: list

    def _generate(self, batch, forced=False):
        self.calls.append([r["page_number"] for r in batch])
        if any(r["page_number"] == 3 for r in batch):
            raise RuntimeError("CUDA out of memory (simulated)")
        super()._generate(batch, forced)


def test_a_failing_batch_is_retried_in_halves_until_only_the_bad_page_fails(tiny_model, sample_docs):
    stage = _FailsOnPage(ModelOptions(name="tiny-random", max_new_tokens=2), loaded=tiny_model)
    stage.calls = []
    page = _pages(sample_docs / "receipt.png")[0]
    batch = [{**page, "page_number": n} for n in (1, 2, 3, 4)]
    out = {r["page_number"]: r for r in stage(batch)}
    assert [out[n]["status"] for n in (1, 2, 3, 4)] == ["ok", "ok", "error", "ok"]
    assert out[3]["error_type"] == "model_error" and "out of memory" in out[3]["error_message"]
    assert stage.calls == [[1, 2, 3, 4], [1, 2], [3, 4], [3], [4]]


def test_from_pretrained_on_a_missing_model_is_a_clear_error(tmp_path):
    from docpipe.errors import ModelLoadError
    from docpipe.model.load import load_model

    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(ModelOptions(name=str(tmp_path / "no-such-model")))


def test_model_inputs_match_the_reference_processor(tiny_model, sample_docs):
    """Pages travel compacted and are preprocessed by the fast (torchvision) processor inside the model stage;
    what the model receives must equal the PIL reference processor's output on the rendered page."""
    import torch
    from PIL import Image
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    from docpipe.ocr import decode_page

    stage = OcrStage(ModelOptions(name="tiny-random", max_new_tokens=1, batch_size=8), loaded=tiny_model)
    pages = _pages(sample_docs / "report.pdf", 2) + _pages(sample_docs / "scan.jpg") + _pages(sample_docs / "receipt.png")
    assert {p["image_codec"] for p in pages} == {"rgb8+zstd"}
    pil_pages = [
        Image.fromarray(decode_page(p["image"], p["image_codec"], p["width"], p["height"]).permute(1, 2, 0).numpy())
        for p in pages
    ]
    reference = Idefics2ImageProcessorPil(**tiny_model.processor.image_processor.to_dict())
    ref = reference([[img] for img in pil_pages], return_tensors="pt")

    ours = stage.prepare_inputs([{**p, "_pixels": decode_page(p["image"], p["image_codec"], p["width"], p["height"])}
                                 for p in pages])
    assert ours["pixel_values"].shape == ref["pixel_values"].shape == (4, 5, 3, 980, 699)  # padded to the widest page
    assert torch.equal(ours["pixel_attention_mask"], ref["pixel_attention_mask"])
    # One uint8 step after normalising to [-1, 1] is 2/255: bilinear rounding may differ by that much.
    assert torch.allclose(ours["pixel_values"].float(), ref["pixel_values"], atol=2 / 255 + 1e-6)
    assert (ours["pixel_values"].float() - ref["pixel_values"]).abs().mean() < 1e-4

    # And through the real stage: the vision tower sees exactly the reference's real (unpadded) images.
    seen = []
    handle = tiny_model.model.model.vision_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["pixel_values"].clone()), with_kwargs=True)
    try:
        stage(pages)
    finally:
        handle.remove()
    [received] = seen
    real = ref["pixel_values"].flatten(0, 1)
    real = real[(real != 0).flatten(1).any(1)]  # the model drops all-zero padding images
    order = sorted(range(len(pages)), key=lambda i: (pages[i]["height"] / pages[i]["width"],
                                                     pages[i]["height"] * pages[i]["width"]))
    expected = torch.cat([real[5 * i : 5 * i + 5] for i in order])  # the stage batches pages sorted by shape
    assert received.shape == expected.shape
    assert torch.allclose(received, expected, atol=2 / 255 + 1e-6)


@pytest.fixture(scope="module")
def no_splitting_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint as a fine-tune saved with image splitting off (like idefics2-8b-base)."""
    import shutil

    copy = tmp_path_factory.mktemp("no-split") / "ckpt"
    shutil.copytree(tiny_checkpoint, copy)
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = copy / name
        if path.exists():
            data = json.loads(path.read_text())
            target = data.get("image_processor", data)
            if "do_image_splitting" in target:
                target["do_image_splitting"] = False
                path.write_text(json.dumps(data))
    return copy


def test_a_checkpoint_saved_without_splitting_is_rendered_and_fed_unsplit(no_splitting_checkpoint, sample_docs):
    """One decision for render size and processor: the checkpoint's own unless the option overrides it."""
    from docpipe.model.load import load_model

    ckpt = str(no_splitting_checkpoint)
    assert render_edge_for(ckpt, ModelOptions()) == 980
    assert render_edge_for(ckpt, ModelOptions(do_image_splitting=True)) == 1960
    opts = ModelOptions(name=ckpt, max_new_tokens=2)
    loaded = load_model(opts)
    assert loaded.processor.image_processor.do_image_splitting is False
    pages = [r for r in expand_document(str(sample_docs / "report.pdf"), RenderOptions(), render_edge_for(ckpt, opts))
             if r["kind"] == "page"][:2]
    assert [max(p["width"], p["height"]) for p in pages] == [980, 980]
    images = []
    handle = loaded.model.model.vision_model.register_forward_pre_hook(
        lambda mod, args, kwargs: images.append(kwargs["pixel_values"].shape), with_kwargs=True)
    try:
        out = OcrStage(opts, loaded=loaded)(pages)
    finally:
        handle.remove()
    assert [r["status"] for r in out] == ["ok", "ok"]
    assert len(images) == 1 and images[0][0] == 2 and max(images[0][2:]) == 980  # one whole-page image per page
    forced = load_model(ModelOptions(name=ckpt, do_image_splitting=True))
    assert forced.processor.image_processor.do_image_splitting is True  # the option overrides the checkpoint


def test_pages_end_on_their_own_or_at_the_token_cap(tiny_model, sample_docs):
    """finish_reason: 'stop' when the model ended the text itself, 'length' when max_new_tokens cut it."""
    pages = _pages(sample_docs / "fax.tiff") + _pages(sample_docs / "receipt.png")
    out = OcrStage(ModelOptions(name="tiny-random", max_new_tokens=8), loaded=tiny_model)([dict(p) for p in pages])
    assert {r["finish_reason"] for r in out} == {"stop", "length"}
    assert all(r["output_tokens"] == 8 for r in out if r["finish_reason"] == "length")
    stopped = [r for r in out if r["finish_reason"] == "stop"]
    # a page that stopped stops at the same token with room to go on, and gives the same text
    key = lambda r: (r["source_uri"], r["page_number"])  # noqa: E731
    again = OcrStage(ModelOptions(name="tiny-random", max_new_tokens=12), loaded=tiny_model)(
        [dict(p) for p in pages if key(p) in {key(r) for r in stopped}])
    assert sorted((key(r), r["output_tokens"], r["text"], r["finish_reason"]) for r in again) == sorted(
        (key(r), r["output_tokens"], r["text"], "stop") for r in stopped)
