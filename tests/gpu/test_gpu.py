"""The GPU tier: what only a CUDA device can show. Skipped, with the reason, on a machine without one.

Needs torch with CUDA, transformers and docpipe's small wheels (pydantic, Pillow, pytest) only: no Ray, no PyMuPDF
(pages are drawn with Pillow, tests/gpu/conftest.py). A test about an optional package (flash-attn, bitsandbytes, peft) skips
with its reason when the package is missing. Models: the tiny random Idefics2 built locally, and idefics2-8b's
architecture with random weights (``random:idefics2-8b``) where the GPU has the memory; nothing is downloaded."""

from __future__ import annotations

import functools
import math

import pytest

from tests.gpu.conftest import NO_CUDA, cuda_available, drawn_pages, engine_texts, free_cuda, require

if not cuda_available():
    pytest.skip(NO_CUDA, allow_module_level=True)

import torch  # noqa: E402


def kernel(record: dict) -> str:
    """The attention kernel the continuous engine's record names: transformers 5.17-5.19 rewrite the shell's to a
    paged one ("paged|sdpa"), later releases keep the name."""
    return record["attention"].removeprefix("paged|")


def sdpa(opts):
    """transformers' packed sdpa for the continuous engine (auto picks torch's varlen kernels on CUDA)."""
    return opts.model_copy(update={"engine_attention": "sdpa"})


def _equal(result: dict, pages: list[dict]) -> None:
    assert set(result["generate"]) == {p["source_uri"] for p in pages}
    assert {row[0] for row in result["generate"].values()} == {"ok"}, result["generate"]
    assert all(row[2] >= 1 for row in result["generate"].values())
    assert result["record"]["engine"] == "continuous", result["record"]  # no fallback to generate mid-run
    assert result["continuous"] == result["generate"]
    # every bank row came back once the pages were done
    assert result["pages_in_flight"] == 0 and result["free"] == [range(0, result["bank_rows"])]


def test_auto_on_cuda_runs_the_continuous_engine_sized_from_the_gpu_memory(load_tiny):
    """The GPU counterpart of tests/test_engines.py's auto test (which needs a machine without CUDA): here the
    continuous engine starts, auto keeps it, and the reason gives the plan sized from the memory left."""
    from docpipe.errors import ModelLoadError
    from docpipe.model.engine import choose_engine
    from docpipe.model.load import stop_and_pad_ids

    loaded, opts = load_tiny(dtype="bfloat16", attention="sdpa")
    assert (loaded.device, loaded.dtype, loaded.attention) == ("cuda", torch.bfloat16, "sdpa")
    stop_ids, pad_id = stop_and_pad_ids(loaded)
    choice = choose_engine(loaded, opts.model_copy(update={"engine": "auto"}), stop_ids, pad_id)
    try:
        assert choice.engine.name == "continuous" and choice.record["engine"] == "continuous"
        # auto on CUDA without flash-attn: torch's own FlashAttention kernels (paged from torch 2.12)
        assert choice.record["requested"] == "auto" and kernel(choice.record).startswith("torch ")
        assert choice.record["reason"].startswith("auto on cuda; ")
        planned = choice.engine.plan.pages_in_flight
        assert f"; {planned} pages in flight, encoding {choice.engine.plan.encode_pages} at a time" in (
            choice.record["reason"])
        assert choice.engine.capacity_pages == planned >= 1
    finally:
        choice.engine.close()
    with pytest.raises(ModelLoadError, match="static_cache and compile are generate options"):
        choose_engine(loaded, opts.model_copy(update={"engine": "continuous", "static_cache": True}), stop_ids, pad_id)


def test_the_continuous_engine_in_bf16_with_sdpa_gives_each_page_what_generate_gives_it_over_a_cycled_bank(
        load_tiny):
    """bf16 and sdpa, the engine's own CUDA-graph choice; a bank of 4 pages for 14 pages, so its rows are reused
    three times over: a row still holding an earlier page's features would change a later page's text."""
    loaded, opts = load_tiny(dtype="bfloat16", attention="sdpa")
    pages = drawn_pages(14)
    result = engine_texts(loaded, sdpa(opts).model_copy(update={"batch_size": 4, "max_pages_in_flight": 4}), pages,
                          encode_pages=2)
    assert result["capacity_pages"] == 4 and len(pages) > 3 * result["capacity_pages"]
    assert kernel(result["record"]) == "sdpa"
    assert 1 <= result["peak_pages_in_flight"] <= 4
    _equal(result, pages)


def test_the_continuous_engine_in_bf16_with_sdpa_and_cuda_graphs_gives_each_page_what_generate_gives_it(
        load_tiny, monkeypatch):
    """The same with CUDA graphs captured for both paths (transformers' heuristic leaves them off for sdpa, which
    needs an attention mask; forced on here): the bank lookup must be capturable (no host synchronisation) and
    a replayed graph must read the rows written after its capture."""
    import transformers

    real = transformers.ContinuousBatchingConfig

    @functools.wraps(real)
    def with_graphs(*args, **kwargs):
        return real(*args, **{**kwargs, "use_cuda_graph": True})

    monkeypatch.setattr(transformers, "ContinuousBatchingConfig", with_graphs)
    loaded, opts = load_tiny(dtype="bfloat16", attention="sdpa")
    pages = drawn_pages(14)
    result = engine_texts(loaded, sdpa(opts).model_copy(update={"batch_size": 4, "max_pages_in_flight": 4}), pages,
                          encode_pages=2)
    assert result["graphs"] == (True, True)
    assert kernel(result["record"]) == "sdpa"
    _equal(result, pages)


def test_flash_attention_2_in_both_engines_gives_the_same_texts(load_tiny):
    require("flash_attn", "the flash_attention_2 kernel (pip install flash-attn) is what this test is about")
    loaded, opts = load_tiny(dtype="bfloat16", attention="flash_attention_2")
    assert loaded.attention == "flash_attention_2"
    pages = drawn_pages(10)
    result = engine_texts(loaded, opts.model_copy(update={"batch_size": 4, "max_pages_in_flight": 4}), pages)
    assert kernel(result["record"]) == "flash_attention_2"
    assert result["graphs"] == (True, True)  # no attention mask with flash: transformers captures both paths
    _equal(result, pages)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_bitsandbytes_quantised_loading_quantises_the_text_model_only_and_both_engines_read_pages(load_tiny, bits):
    require("bitsandbytes", "quantised loading (model.quantization 4bit/8bit) is what this test is about")
    import bitsandbytes as bnb

    loaded, opts = load_tiny(quantization=bits)
    layer = loaded.model.model.text_model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit if bits == "4bit" else bnb.nn.Linear8bitLt), type(layer)
    # the vision tower, connector and lm_head stay in the model's dtype (quantization_config's skip list)
    vision_linear = next(m for m in loaded.model.model.vision_model.modules() if isinstance(m, torch.nn.Linear))
    assert type(vision_linear) is torch.nn.Linear and vision_linear.weight.dtype == loaded.dtype == torch.bfloat16
    assert type(loaded.model.lm_head) is torch.nn.Linear
    assert layer.weight.device.type == "cuda"
    pages = drawn_pages(6)
    result = engine_texts(loaded, opts.model_copy(update={"batch_size": 3, "max_pages_in_flight": 3}), pages)
    assert {row[0] for row in result["generate"].values()} == {"ok"}
    assert {row[0] for row in result["continuous"].values()} == {"ok"}
    assert all(row[2] >= 1 for row in result["continuous"].values())
    assert result["record"]["engine"] == "continuous"
    assert "bitsandbytes weights: no CUDA graphs" in result["record"]["reason"]
    assert result["graphs"] == (False, False)


def test_a_qlora_step_on_the_gpu_trains_the_adapter_over_4bit_weights(tiny_checkpoint, tmp_path):
    """The GPU counterpart of tests/test_finetune.py's test_qlora_without_a_gpu_is_a_clear_error: with CUDA,
    --qlora trains. Two optimizer steps, in this process (no Ray), on pages drawn with Pillow."""
    require("peft", "LoRA adapters (docpipe finetune) need it")
    require("bitsandbytes", "QLoRA loads the base model in 4 bits with it")
    from safetensors.torch import load_file

    from docpipe.config import FinetuneConfig
    from docpipe.tools.finetune import Example, Prepared, examples_hash, train

    config = FinetuneConfig(train="drawn.jsonl", output=str(tmp_path / "adapter"), epochs=2, learning_rate=1e-2,
                            model={"name": "tiny-random", "quantization": "4bit", "do_image_splitting": False},
                            render={"longest_edge": 448})
    examples = [Example(f"drawn.jsonl row {i + 1}", p["source_uri"], "ocr", answer, config.model.prompt, [1],
                        [(p["image"], p["image_codec"], p["width"], p["height"])])
                for i, (p, answer) in enumerate(zip(drawn_pages(2), ["alpha 1", "bravo 2"]))]
    record = train(config, Prepared(examples, [], 0, examples_hash(examples, []), 448))
    assert record["device"] == "cuda" and record["workers"] == 1
    assert record["steps"] == 4 and len(record["losses"]["steps"]) == 4  # 2 examples x 2 epochs, batch 1
    assert all(math.isfinite(x) and x > 0 for x in record["losses"]["steps"])
    assert record["options"]["model"]["quantization"] == "4bit"
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    assert lora_b and len(lora_b) == len(weights) // 2
    # LoRA's B starts at zero: a B that moved is a gradient that reached the adapter through the 4-bit layers
    assert any(t.abs().max() > 0 for t in lora_b)
    torch.set_grad_enabled(False)  # train() turned autograd on for this process
    free_cuda()


RANDOM_8B_BYTES = 24 * 2**30  # 16.8 GB of bf16 weights, then the engine's KV cache, bank and encoding


def test_the_continuous_engine_on_random_idefics2_8b_gives_each_page_what_generate_gives_it():
    """The same equality at idefics2-8b's real sizes (random weights, built on the GPU), bf16 and sdpa, with a bank
    of 2 pages for 6 pages (each row reused three times)."""
    from docpipe.config import ModelOptions
    from docpipe.model.load import load_model

    free_cuda()
    free, _ = torch.cuda.mem_get_info()
    if free < RANDOM_8B_BYTES:
        pytest.skip(f"random:idefics2-8b needs {RANDOM_8B_BYTES / 2**30:.0f} GiB of free GPU memory; "
                    f"{free / 2**30:.1f} GiB free")
    opts = ModelOptions(name="random:idefics2-8b", dtype="bfloat16", attention="sdpa", max_new_tokens=8,
                        do_image_splitting=False, batch_size=2, max_pages_in_flight=2, engine_attention="sdpa")
    loaded = load_model(opts)
    try:
        params = sum(p.numel() for p in loaded.model.parameters())
        assert 8.3e9 < params < 8.5e9 and loaded.device == "cuda"
        pages = drawn_pages(6, edge_scale=2.0)
        result = engine_texts(loaded, opts, pages)
        assert result["capacity_pages"] == 2 and kernel(result["record"]) == "sdpa"
        _equal(result, pages)
    finally:
        del loaded
        free_cuda()


# ------------------------------------------------------------------------------------------------ torch's varlen path
def _judged(loaded, opts, pages: list[dict], path: str) -> tuple[list[dict], str]:
    """generate's tokens and logits per page alone, and the continuous engine's on ``path``, judged as bench
    --gpu-check judges them: equal, or a flip within the dtype's rounding of generate's margin (a near tie)."""
    from docpipe.ocr import OcrStage
    from docpipe.tools.gpu_check import _continuous_tokens, _generate_with_logits, _judge

    reference = _generate_with_logits(loaded, opts, pages, OcrStage(opts.model_copy(update={"engine": "generate"}),
                                                                    loaded=loaded))
    tokens, attention = _continuous_tokens(loaded, opts.model_copy(update={"engine_attention": path}), pages)
    return [_judge(ref, t, loaded.dtype) for ref, t in zip(reference, tokens)], attention


@pytest.mark.parametrize("form", ["paged", "gathered"])
def test_torch_varlen_kernels_in_the_continuous_engine_give_generate_s_tokens_in_bf16_up_to_near_ties(
        load_tiny, monkeypatch, form):
    """torch's FlashAttention kernels (pipeline/model/attention.py) against generate, page by page, in bf16: the
    paged form (varlen_attn through a block table, torch 2.12 on) and the gathered one (the op beneath it, what
    torch 2.10-2.11 run). A page may differ only where generate's own margin is within bf16's rounding; most match
    exactly (on a wrong index or a race, none would)."""
    from docpipe.model import attention

    if form == "paged" and "block_table" not in attention.varlen_signature():
        pytest.skip(f"torch {torch.__version__}'s varlen_attn has no paged form (2.12 on)")
    if form == "gathered":
        monkeypatch.setattr(attention, "torch_kernel", attention.aten_kernel)
    loaded, opts = load_tiny(dtype="bfloat16", attention="sdpa")
    pages = drawn_pages(10)
    verdicts, name = _judged(loaded, opts.model_copy(update={"batch_size": 4}), pages, "varlen")
    assert name.startswith("torch ") and name.endswith(form), name
    assert [v for v in verdicts if v["verdict"] == "disagree"] == []
    assert sum(v["verdict"] == "equal" for v in verdicts) >= 8, verdicts


def test_torch_varlen_kernels_read_what_sdpa_reads_over_a_cycled_bank_and_fill_the_plan(load_tiny):
    """The same pages on transformers' packed sdpa and torch's varlen kernels, a bank of 4 pages for 14: the same
    tokens up to bf16 near ties, every bank row back, and the varlen plan above sdpa's cap (no mask, no cap)."""
    from docpipe.model.sizing import SDPA_MAX_PAGES

    loaded, opts = load_tiny(dtype="bfloat16", attention="sdpa")
    pages = drawn_pages(14)
    small = opts.model_copy(update={"batch_size": 4, "max_pages_in_flight": 4})
    varlen = engine_texts(loaded, small, pages, encode_pages=2)
    assert kernel(varlen["record"]).startswith("torch ")
    assert varlen["pages_in_flight"] == 0 and varlen["free"] == [range(0, varlen["bank_rows"])]
    same = sum(varlen["continuous"][k][1] == varlen["generate"][k][1] for k in varlen["generate"])
    assert same >= 12, (varlen["continuous"], varlen["generate"])
    from docpipe.model.engine import choose_engine
    from docpipe.model.load import stop_and_pad_ids

    stop_ids, pad_id = stop_and_pad_ids(loaded)
    for path, least in (("varlen", SDPA_MAX_PAGES + 1), ("sdpa", None)):
        choice = choose_engine(loaded, opts.model_copy(update={"engine": "continuous", "engine_attention": path}),
                               stop_ids, pad_id)
        try:
            planned = choice.engine.plan.pages_in_flight
            assert planned >= least if least else planned == SDPA_MAX_PAGES, (path, choice.engine.plan)
        finally:
            choice.engine.close()


def test_encoding_on_its_own_stream_while_pages_decode_leaves_every_page_generate_s_tokens(load_tiny, monkeypatch):
    """bench --gpu-check's overlap section: three calls in flight (threads), the later ones' vision encoding held
    until the loop has made two more steps, so their encode work is issued while pages decode (on the engine's own
    stream; the loop's forwards ordered after their input copies). Every page keeps generate's tokens, up to bf16
    near ties, and the loop stepped during encoding."""
    import threading

    from docpipe.model import continuous
    from docpipe.tools.gpu_check import overlap

    loaded, opts = load_tiny(dtype="bfloat16", attention="sdpa")
    engines, stepped = [], threading.Condition()
    real_init = continuous.ContinuousEngine.__init__

    def remember(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        engines.append(self)

        def count(module, args):
            with stepped:
                stepped.notify_all()

        self.lm.register_forward_pre_hook(count)

    def held(module, args):
        timeline = engines[-1].timeline if engines else None
        if timeline and timeline["steps"]:  # pages decode: a later call's encoding
            start = len(timeline["steps"])
            with stepped:  # a safety net: 60 s
                assert stepped.wait_for(lambda: len(timeline["steps"]) >= start + 2, timeout=60)

    monkeypatch.setattr(continuous.ContinuousEngine, "__init__", remember)
    handle = loaded.model.model.vision_model.register_forward_pre_hook(held)
    try:
        out = overlap(loaded, opts.model_copy(update={"max_new_tokens": 48, "batch_size": 4}), drawn_pages(12), 3)
    finally:
        handle.remove()
    assert "error" not in out, out
    assert out["pages"] == 12 and out["pages_equal"] + out["near_ties"] == 12 and out["pages_equal"] >= 10, out
    assert out["steps_during_encode"] >= 2 and out["attention"].startswith("torch "), out
