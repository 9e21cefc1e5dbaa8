"""Model families beyond Idefics2 (pipeline/model/families/): Idefics3 (tiny-random-idefics3), the DocTags writers
(tiny-random-granite-docling, with granite-docling-258M's tokenizer conventions) and LightOnOCR
(tiny-random-lighton), each a tiny random checkpoint built locally and loaded through from_pretrained.

Runs use the local executor (no Ray) on a small PDF and an image; the tiny models' texts are noise, so engine
equality is checked on them, and the output converters on real published outputs (DocTags from docling-core's test
data, LightOnOCR's from transformers' tests)."""

import json
import re

import pyarrow.parquet as pq
import pytest

from tests.conftest import run_cli

FAMILIES = ["tiny-random-idefics3", "tiny-random-granite-docling", "tiny-random-lighton"]

# Page 10 of arXiv 2305.03393v1 (the OTSL paper) in DocTags, from docling-core's test data
# (docling-project/docling-core, test/data/doc/2305.03393v1.out.dt, MIT): running heads, a table with row and column
# spans and its caption, a section header, a paragraph, a picture with its caption.
PAGE_10 = """<doctag><page_header><loc_110><loc_59><loc_118><loc_64>10</page_header>
<page_header><loc_137><loc_59><loc_189><loc_64>M. Lysak, et al.</page_header>
<otsl><loc_117><loc_99><loc_385><loc_166><ched>Data set<ched>Language<ched>TEDs<lcel><lcel><ched>mAP(0.75)<ched>\
Inference time (secs)<nl><ucel><ucel><ched>simple<ched>complex<ched>all<ucel><ucel><nl><fcel>PubTabNet<fcel>OTSL HTML\
<fcel>0.965 0.969<fcel>0.934 0.927<fcel>0.955 0.955<fcel>0.88 0.857<fcel>2.73 5.39<nl><fcel>FinTabNet<fcel>OTSL HTML\
<fcel>0.955 0.917<fcel>0.961 0.922<fcel>0.959 0.92<fcel>0.862 0.722<fcel>1.85 3.26<nl><fcel>PubTables-1M<fcel>OTSL \
HTML<fcel>0.987 0.983<fcel>0.964 0.944<fcel>0.977 0.966<fcel>0.896 0.889<fcel>1.79 3.26<nl><caption><loc_110><loc_73>\
<loc_393><loc_92>Table 2. TSR and cell detection results compared between OTSL and HTML on the PubTabNet [22], \
FinTabNet [21] and PubTables-1M [14] data sets using TableFormer [9] (with enc=6, dec=6, heads=8).</caption></otsl>
<section_header_level_1><loc_110><loc_182><loc_210><loc_188>5.3 Qualitative Results</section_header_level_1>
<text><loc_110><loc_196><loc_393><loc_231>To illustrate the qualitative differences between OTSL and HTML, Figure 5 \
demonstrates less overlap and more accurate bounding boxes with OTSL.</text>
<picture><loc_133><loc_281><loc_369><loc_419><caption><loc_110><loc_251><loc_393><loc_278>Fig. 5. The OTSL model \
produces more accurate bounding boxes with less overlap (E) than the HTML model (D).</caption></picture>
</doctag>"""


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    """A two-page PDF (a heading, a table) and a PNG: small, as the tiny models' images are."""
    import pymupdf
    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("family-docs")
    pdf = pymupdf.open()
    for n in (1, 2):
        page = pdf.new_page(width=300, height=400)
        page.insert_text((30, 40), f"Invoice {n}", fontsize=18)
        page.insert_text((30, 80), f"Total {n * 42} EUR  Qty {n}", fontsize=11)
    pdf.save(folder / "invoice.pdf")
    image = Image.new("RGB", (260, 180), "white")
    ImageDraw.Draw(image).text((10, 10), "Receipt 7\nCoffee 3.50", fill="black")
    image.save(folder / "receipt.png")
    return folder


def _run(inputs, out, **options):
    from docpipe.config import RunConfig
    from docpipe.execute.run import run

    config = RunConfig(inputs=[str(p) for p in inputs], output=str(out), executor="local", progress=False,
                       route={"text_layer": "never"}, **options)
    run(config)
    return {(r["source_uri"].rsplit("/", 1)[-1], r["page_number"]): r for r in pq.read_table(out / "pages").to_pylist()}


@pytest.mark.parametrize("kind", FAMILIES)
def test_each_family_runs_pdfs_and_images_with_both_engines_to_the_same_texts_batched_as_solo(kind, docs, tmp_path):
    """A run on a PDF and an image with --engine generate (pages batched 4 to a call) and --engine continuous:
    every page accounted for, the same texts and lengths; and each page decoded alone (generate, batch 1) gives
    the same text as in its batch."""
    from docpipe.config import ModelOptions, RenderOptions
    from docpipe.model.load import load_model, render_edge_for, resolve_checkpoint
    from docpipe.ocr import OcrStage
    from docpipe.render.document import expand_document

    model = {"name": kind, "max_new_tokens": 8, "batch_size": 4}
    inputs = [docs / "invoice.pdf", docs / "receipt.png"]
    gen = _run(inputs, tmp_path / "gen", model={**model, "engine": "generate"})
    cont = _run(inputs, tmp_path / "cont", model={**model, "engine": "continuous"})
    keys = {("invoice.pdf", 1), ("invoice.pdf", 2), ("receipt.png", 1)}
    assert set(gen) == set(cont) == keys
    assert all(r["status"] == "ok" and r["text_source"] == "model" and r["model"] == kind for r in gen.values())
    result = lambda r: (r["text"], r["output_tokens"], r["finish_reason"], r["blocks"])  # noqa: E731
    assert {k: result(r) for k, r in cont.items()} == {k: result(r) for k, r in gen.items()}
    assert any(r["text"] for r in gen.values())  # image-sensitive noise, not nothing

    opts = ModelOptions(name=kind, max_new_tokens=8, engine="generate", batch_size=1)
    edge = render_edge_for(resolve_checkpoint(kind), opts)
    pages = [r for p in inputs for r in expand_document(str(p), RenderOptions(), edge) if r["kind"] == "page"]
    solo = OcrStage(opts, loaded=load_model(opts))(pages)
    assert {(r["source_uri"].rsplit("/", 1)[-1], r["page_number"]): result(r) for r in solo} == {
        k: result(r) for k, r in gen.items()}


@pytest.mark.parametrize("kind", ["tiny-random-idefics3", "tiny-random-lighton"])
def test_generate_encoding_a_page_a_vision_call_passes_each_page_its_own_arguments(kind):
    """generate's bounded encoding (a page a vision call, as on a GPU with little memory left: engine.py) hands each
    call its pages' own arguments (Idefics3's pixel_attention_mask, LightOnOCR's image_sizes, which transformers'
    generate passes only when the encoder's signature names them): the same tokens as one call over the batch."""
    import functools

    import torch

    from docpipe.config import ModelOptions
    from docpipe.model.load import load_model
    from docpipe.ocr import OcrStage

    opts = ModelOptions(name=kind, engine="generate", batch_size=2, max_new_tokens=6)
    loaded = load_model(opts)
    stage = OcrStage(opts, loaded=loaded)
    g = torch.Generator().manual_seed(0)
    records = [{"_pixels": torch.randint(0, 255, (3, h, w), dtype=torch.uint8, generator=g)}
               for h, w in ((84, 140), (168, 56))]  # two shapes: per-page sizes and masks differ
    inputs = stage.prepare_inputs(records)
    inner, calls = loaded.model.model, []
    original = type(inner).get_image_features

    @functools.wraps(original)
    def counted(self, pixel_values, *args, **kwargs):
        calls.append(pixel_values.shape[0])
        return original(self, pixel_values, *args, **kwargs)

    assert stage.engine.encode_pages == 2
    type(inner).get_image_features = counted
    try:
        whole = [r.tokens for r in stage.engine.generate(inputs, [6, 6])]
        assert calls == [2]
        stage.engine.encode_pages, calls[:] = 1, []
        assert [r.tokens for r in stage.engine.generate(inputs, [6, 6])] == whole
        assert calls == [1, 1]
    finally:
        type(inner).get_image_features = original


def test_published_doctags_become_our_markdown_and_blocks_cell_by_cell():
    from docpipe.model.families.doctags import blocks_to_doctags, doctags_page
    from docpipe.model.families.markdown import table_cells

    text, blocks = doctags_page(PAGE_10)
    kinds = [b["kind"] for b in blocks]
    assert kinds == ["page_number", "page_header", "caption", "table", "heading", "paragraph", "caption", "picture"]
    # boxes: the 0-500 grid as fractions of the page, origin top left
    number = blocks[0]
    assert (number["text"], number["x0"], number["y0"], number["x1"], number["y1"]) == ("10", 0.22, 0.118, 0.236, 0.128)
    table = blocks[3]
    assert (table["x0"], table["y0"], table["x1"], table["y1"]) == (0.234, 0.198, 0.77, 0.332)
    # written as the text layer writes tables (render/tables.py): its two header rows, "TEDs" spanning three columns
    # over "simple", "complex", "all", joined into one header row, each column's header above its cells
    cells = {(r, c): (rs, cs, t) for r, c, rs, cs, t in table_cells(table["text"])}
    assert [cells[(0, c)][2] for c in range(7)] == ["Data set", "Language", "TEDs simple", "TEDs complex", "TEDs all",
                                                    "mAP(0.75)", "Inference time (secs)"]
    assert [cells[(3, c)][2] for c in range(7)] == ["PubTables-1M", "OTSL HTML", "0.987 0.983", "0.964 0.944",
                                                    "0.977 0.966", "0.896 0.889", "1.79 3.26"]
    assert len(cells) == 4 * 7 and all(rs == cs == 1 for rs, cs, _ in cells.values())
    # the page's text: furniture out, the heading as #, the picture without text
    assert "10" not in text.split("\n") and "M. Lysak" not in text
    assert "\n\n# 5.3 Qualitative Results\n\n" in text and text.startswith("Table 2. TSR")
    assert "<table>" not in text and "| Data set | Language | TEDs simple | TEDs complex |" in text
    # a table without spans is a Markdown table with its first row as the header
    simple = doctags_page("<doctag><otsl><loc_10><loc_10><loc_490><loc_90><ched>Item<ched>Qty<nl><fcel>Apple<fcel>2<nl>"
                          "</otsl></doctag>")[0]
    assert simple == "| Item | Qty |\n|---|---|\n| Apple | 2 |"
    # what a DocTags model learns in fine-tuning: blocks written back as DocTags, read again to the same page
    assert doctags_page(blocks_to_doctags(blocks)) == (text, blocks)


def test_a_doctags_page_written_by_the_model_becomes_its_pages_row_text_and_blocks():
    """The published page 10, as granite-docling's tokens closed by <|end_of_text|> and followed by padding, through
    the OCR stage's own output path (what it does with an engine's Generation: the family's decode keeping the tags,
    docling-core's reading): the row holds the converter's text and blocks, and keeps them in the result table the
    sink writes pages rows from."""
    from docpipe.config import ModelOptions
    from docpipe.model.families.doctags import doctags_page
    from docpipe.model.generation import Generation
    from docpipe.model.load import load_model
    from docpipe.ocr import OcrStage
    from docpipe.records import PAGE, RESULT_SCHEMA, to_table

    opts = ModelOptions(name="tiny-random-granite-docling", engine="generate")
    stage = OcrStage(opts, loaded=load_model(opts))
    tokens = stage.m.processor.tokenizer(PAGE_10 + "<|end_of_text|>", add_special_tokens=False)["input_ids"]
    rec = {"kind": PAGE, "status": "ok", "source_uri": "otsl.pdf", "page_number": 10}
    stage._fill([rec], [Generation.from_tokens(tokens + [stage.pad_id] * 3, stage.stop_ids)])
    text, blocks = doctags_page(PAGE_10)
    assert (rec["text"], rec["blocks"], rec["finish_reason"], rec["text_source"]) == (text, blocks, "stop", "model")
    assert text.startswith("Table 2. TSR") and len(blocks) == 8  # the page, not glued words or nothing
    [row] = to_table([rec], RESULT_SCHEMA).to_pylist()
    assert row["text"] == text and [(b["kind"], b["text"]) for b in row["blocks"]] == [
        (b["kind"], b["text"]) for b in blocks]
    box = ("x0", "y0", "x1", "y1")
    assert [row_b[k] for row_b in row["blocks"] for k in box] == pytest.approx(
        [b[k] for b in blocks for k in box], abs=1e-6)  # float32 in the contract


# LightOnOCR-1B-1025's greedy output on SROIE-receipt.jpeg (hf-internal-testing/fixtures_ocr), cut at 50 new tokens,
# verbatim from transformers' integration test (huggingface/transformers,
# tests/models/lighton_ocr/test_modeling_lighton_ocr.py, test_lightonocr_ocr_integration, Apache-2.0). The only
# verbatim published LightOnOCR page output found; no LightOnOCR-2 output with a whole table was found published
# as text (model cards, the lightonai/LightOnOCR repository, blog posts; the datasets with its outputs keep them in
# Parquet), so the table conversion below is checked on a sample in its README's format.
SROIE_LIGHTONOCR_1 = ("Document No : TD01167104\n\nDate : 25/12/2018 8:13:39 PM\n\nCashier : MANIS\n\nMember :\n\n"
                      "CASH BILL\n\n| CODE")


def test_lightonocr_markdown_is_brought_to_our_conventions():
    """LightOnOCR writes Markdown with HTML tables and LaTeX between dollars (its README's 'plain' mode)."""
    from docpipe.model.families.lighton import LightOnOcr
    from docpipe.model.families.markdown import normalise_markdown

    # a published output, as the stage's converter reads it: already our Markdown, kept as written, the table its
    # token budget cut after one cell included (nothing dropped), and no blocks (plain mode gives no boxes)
    assert LightOnOcr().page_output(SROIE_LIGHTONOCR_1) == (SROIE_LIGHTONOCR_1, None)

    raw = ("## Invoice 7\n\nPrice $5 and $10; energy $E = mc^2$, escaped \\$3\\$.\n\n$$\n\\frac{a}{b}\n$$\n\n"
           "<table><thead><tr><th>Item</th><th>Qty</th></tr></thead><tbody><tr><td>Apple</td><td>2</td></tr>"
           "</tbody></table>\n\n<table><tr><th rowspan=\"2\">A</th><th colspan=\"2\">B</th></tr><tr><td>b1</td>"
           "<td>b2</td></tr></table>\n\n\\begin{tabular}{|l|c|}\\hline x & y \\\\ \\multicolumn{2}{c}{wide} \\\\"
           "\\end{tabular}")
    assert normalise_markdown(raw) == (
        "## Invoice 7\n\nPrice $5 and $10; energy \\(E = mc^2\\), escaped \\$3\\$.\n\n\\[ \\frac{a}{b} \\]\n\n"
        "| Item | Qty |\n|---|---|\n| Apple | 2 |\n\n| A | B | B |\n|---|---|---|\n|  | b1 | b2 |\n\n"
        "| x | y |\n|---|---|\n| wide |  |")  # tables as the text layer writes them: a group header over its
    # columns, a row holding one spanning label as a group row


def test_granite_docling_tokenizer_conventions_and_doctags_decoding():
    """Every DocTags tag a special token, turns ending with <|end_of_text|>, the <end_of_utterance> the Idefics3
    processor adds lying past the embedding (left out of the stop tokens); decoding keeps the tags, so a page is a
    table, not glued words."""
    from docpipe.config import ModelOptions
    from docpipe.model.load import load_model, model_options

    m = load_model(ModelOptions(name="tiny-random-granite-docling"))
    tok, family = m.processor.tokenizer, m.family
    assert family.output == "doctags" and not family.follows_instructions
    rows = m.model.get_output_embeddings().weight.shape[0]
    assert tok.convert_tokens_to_ids("<end_of_utterance>") == rows  # one past the embedding
    assert family.end_of_turn() == "<|end_of_text|>"
    assert family.stop_and_pad_ids(m.model) == ([tok.convert_tokens_to_ids("<|end_of_text|>")],) * 1 + (
        tok.pad_token_id,)
    opts = model_options(ModelOptions(name="tiny-random-granite-docling"), family)
    assert (opts.prompt, opts.max_new_tokens) == ("Convert this page to docling.", 8192)
    ids = tok("<doctag><otsl><ched>Total<ched>EUR<nl><fcel>42<fcel>7<nl></otsl></doctag><|end_of_text|>",
              add_special_tokens=False)["input_ids"]
    assert all(tok.convert_ids_to_tokens(i) in tok.get_added_vocab() for i in ids[:3])  # tags are single tokens
    assert tok.decode(ids, skip_special_tokens=True) == "TotalEUR427"  # what skipping special tokens gave
    text, blocks = family.page_output(family.decode(ids))
    assert text == "| Total | EUR |\n|---|---|\n| 42 | 7 |" and blocks is None  # no boxes given: no blocks


def test_an_unsupported_architecture_a_missing_folder_and_an_offline_preset_fail_in_one_line(docs, tmp_path):
    folder = tmp_path / "granite-docling-500m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["GraniteDoclingForConditionalGeneration"],
                                                    "model_type": "granite_docling"}))
    cases = {str(folder): "GraniteDoclingForConditionalGeneration, not a supported architecture: it injects image "
                          "features into several decoder layers (DeepStack)",
             "./nosuch-model": "no such model folder: ./nosuch-model",  # the run's check, before any load
             "granite-docling-258m": "model granite-docling-258m (ibm-granite/granite-docling-258M) is not in the "
                                     "local Hugging Face cache and HF_HUB_OFFLINE is set"}
    for model, message in cases.items():
        proc = run_cli("run", docs / "receipt.png", "--output", tmp_path / "out", "--model", model, "--no-progress")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
        if "supported" in message:
            assert "Idefics2" in lines[0] and "Idefics3" in lines[0] and "LightOnOCR" in lines[0]


@pytest.mark.parametrize("arch, params, edge, rows", [
    ("granite-docling-258m", (255e6, 260e6), 2048, 17 * 64),
    ("smoldocling-256m", (253e6, 259e6), 2048, 17 * 64),
    ("smolvlm-500m", (503e6, 510e6), 2048, 17 * 64),
    ("idefics3-8b", (8.4e9, 8.6e9), 1456, 17 * 169),
    ("lightonocr-2-1b", (0.95e9, 1.05e9), 1540, 55 * 55),
])
def test_shipped_architectures_build_with_random_weights_and_size_the_engine(arch, params, edge, rows):
    """--random-weights NAME: the real checkpoint's architecture (on the meta device: no memory), its processor's
    geometry (render size, a page's most image tokens) and the engine's plan for an 80 GB card."""
    import torch

    from docpipe.config import ModelOptions
    from docpipe.model import sizing
    from docpipe.model.families import family_of
    from docpipe.model.load import render_edge_for, resolve_checkpoint
    from docpipe.model.tiny import build_random_model

    model, processor = build_random_model(arch, "meta", torch.bfloat16, "sdpa")
    assert params[0] < sum(p.numel() for p in model.parameters()) < params[1]
    assert render_edge_for(resolve_checkpoint(f"random:{arch}"), ModelOptions(name=f"random:{arch}")) == edge
    family = family_of(model, processor)
    assert family.max_image_rows(model) == rows
    text = model.config.text_config
    kv = sizing.kv_bytes_per_page(text, family.prompt_tokens(family.chat_prompt(1, family.ocr_prompt)), 1024, 2)
    plan = sizing.plan_pages(60 * 2**30, 80 * 2**30, kv, family.encode_bytes_per_page(model.config, 2),
                             rows * text.hidden_size * 2, 16)
    assert plan.pages_in_flight >= 64 and 1 <= plan.encode_pages <= 16


def test_ocr_only_models_extract_from_their_page_text_and_idefics3_extracts_itself(docs, tmp_path, monkeypatch):
    """An OCR-only model (DocTags, LightOnOCR) reads the page; the text it wrote, the pages row's, is what the
    extraction model is prompted with (no image), and its JSON is schema-valid. Idefics3 reads the image itself. With
    no usable extraction model (another OCR-only one; the default, not cached offline) the run fails in one error."""
    from docpipe.errors import ModelLoadError
    from docpipe.model.families.base import Family

    prompted, text_inputs = [], Family.text_inputs

    def recorded(self, m, prompts):  # the real prompts-without-images path, watched: what the model was given
        prompted.extend((m.name, p) for p in prompts)
        return text_inputs(self, m, prompts)

    monkeypatch.setattr(Family, "text_inputs", recorded)
    extract = {"schema": "receipt", "max_new_tokens": 64, "max_string_chars": 8, "retry_temperature": 0}  # short noise
    for model, extractor in (("tiny-random-granite-docling", "tiny-random"), ("tiny-random-lighton", "tiny-random"),
                             ("tiny-random-idefics3", None)):
        out, prompted[:] = tmp_path / model, []
        [page] = _run([docs / "receipt.png"], out, task="ocr+extract", model={"name": model, "max_new_tokens": 8},
                      extract={**extract, "model": extractor}).values()
        [doc] = pq.read_table(out / "documents").to_pylist()
        assert doc["status"] == "ok" and doc["valid"] is True and json.loads(doc["extraction"]), doc
        assert page["status"] == "ok" and page["model"] == model
        if extractor is None:
            assert prompted == []  # its own page images, no text prompt
            continue
        [(name, prompt)] = prompted
        # the page's whole text, the extraction model's turn end (<end_of_utterance>) right after it
        assert name == extractor and page["text"] and f"--- page 1 ---\n{page['text']}<" in prompt, (page, prompt)

    for extractor, error, message in (
            ("tiny-random-lighton", ModelLoadError, "extraction model 'tiny-random-lighton' is OCR-only too"),
            (None, ModelLoadError, "tiny-random-granite-docling is OCR-only: its pages' text goes to the extraction "
                                   "model (--extract-model), 'HuggingFaceM4/idefics2-8b', which cannot be loaded")):
        with pytest.raises(error, match=re.escape(message)):
            _run([docs / "receipt.png"], tmp_path / f"fails-{extractor}", task="ocr+extract",
                 model={"name": "tiny-random-granite-docling", "max_new_tokens": 8},
                 extract={**extract, "model": extractor})


END_OF_TURN = {"tiny-random-idefics3": "<end_of_utterance>", "tiny-random-granite-docling": "<|end_of_text|>",
               "tiny-random-lighton": "<|im_end|>"}


@pytest.mark.parametrize("kind", FAMILIES)
def test_finetune_one_step_with_the_family_template_then_run_with_the_adapter(kind, docs, tmp_path):
    """Labels are the answer and the family's end of turn (Idefics3: closed by <end_of_utterance>; granite: DocTags
    written from the page's blocks, closed by <|end_of_text|>; LightOnOCR: closed by <|im_end|>); LoRA adapts the
    family's decoder; the adapter loads."""
    from docpipe.config import FinetuneConfig, ModelOptions
    from docpipe.model.load import load_model
    from docpipe.ocr import OcrStage
    from docpipe.tools.finetune import IGNORE, encode, prepare_examples, train

    row = {"source_uri": str(docs / "receipt.png"), "page_number": 1, "text": "Receipt 7",
           "blocks": [{"kind": "paragraph", "text": "Receipt 7", "x0": 0.1, "y0": 0.1, "x1": 0.6, "y1": 0.2}]}
    (tmp_path / "train.jsonl").write_text(json.dumps(row) + "\n")
    config = FinetuneConfig(train=str(tmp_path / "train.jsonl"), output=str(tmp_path / "adapter"), epochs=1,
                            model={"name": kind}, gradient_checkpointing=False, learning_rate=1e-2)
    prepared = prepare_examples(config)
    m = load_model(config.model)
    batch = encode(m, prepared.train, "cpu")
    learned = batch["labels"][0][batch["labels"][0] != IGNORE].tolist()
    answer = m.processor.tokenizer.decode(learned)
    end = END_OF_TURN[kind]
    assert answer.endswith(end) and learned[-1] == m.processor.tokenizer.convert_tokens_to_ids(end)
    assert "Receipt 7" in answer and (("<doctag><text>" in answer) == ("granite" in kind))
    record = train(config, prepared)
    assert record["steps"] == 1 and len(record["losses"]["steps"]) == 1

    tuned = load_model(ModelOptions(name=kind, adapter=str(tmp_path / "adapter")))
    decoder = m.family.decoder
    base_q = dict(m.model.named_parameters())[f"model.{decoder}.layers.0.self_attn.q_proj.weight"]
    tuned_q = dict(tuned.model.named_parameters())[f"model.{decoder}.layers.0.self_attn.q_proj.weight"]
    assert not (base_q == tuned_q).all()  # the merged adapter changed the decoder
    [page] = OcrStage(ModelOptions(name=kind, max_new_tokens=4), loaded=tuned)(
        [r for r in __import__("docpipe.render.document", fromlist=["x"]).expand_document(
            str(docs / "receipt.png"), config.render, 224) if r["kind"] == "page"])
    assert page["status"] == "ok" and page["output_tokens"] >= 1
