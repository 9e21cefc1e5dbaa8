"""`docpipe finetune`: LoRA adapters trained on rows in the pipeline's own shape, on the tiny model on the CPU.

The tiny model is image-sensitive (pipeline/model/tiny.py), so distinct labels for distinct pages are learnable
and a test can tell an adapter that learned them from one that did not. To stay fast on two cores, the
training tests render small pages without image splitting, and run with the same options, as a user must.
"""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import run_cli

# Options shared by `docpipe finetune` and the `docpipe run` that uses its adapter: small pages, one image
# per page, one torch thread (two contend on a loaded 2-core machine).
MODEL = {"name": "tiny-random", "do_image_splitting": False, "cpu_threads": 1}
RENDER = {"longest_edge": 448}
# A high, decaying learning rate and no dropout: the random model learns four labels in 32 short epochs (24 left
# one label wrong on an AVX2-only CPU, whose float sums differ from an AVX-512 one; 28 was enough there).
TRAINING = {"learning_rate": 1e-2, "lr_scheduler": "linear", "lora": {"dropout": 0.0}, "gradient_checkpointing": True}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _job(path: Path, **options) -> Path:
    path.write_text(yaml.safe_dump(options))
    return path


def _run_with_adapter(tmp_path: Path, inputs: list, adapter: Path, **extra) -> Path:
    out = tmp_path / "run"
    job = _job(tmp_path / "run.yaml", executor="local", output=str(out), inputs=[str(i) for i in inputs],
               model={**MODEL, "adapter": str(adapter), "max_new_tokens": 12}, render=RENDER,
               **{"route": {"text_layer": "never"}, **extra})  # the adapter's model reads every page
    proc = run_cli("run", "--config", job, "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "docpipe: warning: adapter" not in proc.stderr  # run with the options the adapter was trained with
    return out


def test_labels_mask_everything_but_the_answer_and_training_sees_the_inference_inputs(tiny_model, sample_docs):
    """A real OCR prompt at the run's size, with image splitting: only the answer's tokens and the closing
    <end_of_utterance> are learned; the prompt, pixels and all, is exactly what OcrStage sends."""
    import torch

    from docpipe.config import ModelOptions, RenderOptions
    from docpipe.render.document import expand_document
    from docpipe.tools.finetune import IGNORE, Example, encode
    from docpipe.ocr import OcrStage

    page = next(r for r in expand_document(str(sample_docs / "report.pdf"), RenderOptions(), 1960)
                if r["kind"] == "page")
    opts = ModelOptions(name="tiny-random")
    ex = Example("row 1", page["source_uri"], "ocr", "Total 42", opts.prompt, [1],
                 [(page["image"], page["image_codec"], page["width"], page["height"])])
    inputs = encode(tiny_model, [ex], "cpu")
    ids, labels = inputs["input_ids"][0].tolist(), inputs["labels"][0].tolist()
    tok = tiny_model.processor.tokenizer

    learned = [i for i, label in enumerate(labels) if label != IGNORE]
    assert learned == list(range(learned[0], len(ids)))  # one span, at the end (a batch of one has no padding)
    assert [labels[i] for i in learned] == ids[learned[0]:]
    assert tok.decode(ids[learned[0]:]) == " Total 42<end_of_utterance>"
    assert ids[learned[-1]] == tok.convert_tokens_to_ids("<end_of_utterance>")
    image, fake = tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<fake_token_around_image>")
    assert ids.count(image) == 5 * 64 and ids.count(fake) == 6  # the page as 5 images, all before the answer
    assert all(labels[i] == IGNORE for i, t in enumerate(ids) if t in (image, fake))

    stage = OcrStage(opts, loaded=tiny_model)
    rec = {**page, "_pixels": None}
    from docpipe.ocr import decode_page

    rec["_pixels"] = decode_page(page["image"], page["image_codec"], page["width"], page["height"])
    reference = stage.prepare_inputs([rec])
    assert ids[: learned[0]] == reference["input_ids"][0].tolist()
    assert torch.equal(inputs["pixel_values"], reference["pixel_values"])
    assert torch.equal(inputs["pixel_attention_mask"], reference["pixel_attention_mask"])


def test_a_batch_learns_only_the_answers_whatever_the_processor_padding(tiny_model, sample_docs):
    from docpipe.config import RenderOptions
    from docpipe.render.document import expand_document
    from docpipe.tools.finetune import IGNORE, Example, encode

    pages = [r for r in expand_document(str(sample_docs / "receipt.png"), RenderOptions(), 448) if r["kind"] == "page"]
    img = [(pages[0]["image"], pages[0]["image_codec"], pages[0]["width"], pages[0]["height"])]
    batch = [Example("a", "x", "ocr", "a", "Read.", [1], img), Example("b", "x", "ocr", "a much longer answer", "Read.", [1], img)]
    tok = tiny_model.processor.tokenizer
    for side in ("left", "right"):
        tok.padding_side = side
        try:
            inputs = encode(tiny_model, batch, "cpu")
        finally:
            tok.padding_side = "left"
        for row, ex in enumerate(batch):
            ids, labels = inputs["input_ids"][row].tolist(), inputs["labels"][row].tolist()
            kept = [t for t, label in zip(ids, labels) if label != IGNORE]
            assert tok.decode(kept) == f" {ex.answer}<end_of_utterance>"
            # right padding: the row's real tokens first, so its positions start at 0 as in generation
            real = inputs["attention_mask"][row].tolist()
            assert real == sorted(real, reverse=True) and real[0] == 1


def test_finetune_learns_page_labels_and_run_with_the_adapter_writes_them(sample_docs, tmp_path):
    rows = [
        {"source_uri": str(sample_docs / "report.pdf"), "page_number": 1, "text": "alpha"},
        {"source_uri": str(sample_docs / "minutes.pdf"), "page_number": 1, "text": "bravo 12"},
        {"source_uri": str(sample_docs / "receipt.png"), "page_number": 1, "text": "charlie"},
        {"source_uri": str(sample_docs / "fax.tiff"), "page_number": 2, "text": "delta 7"},
    ]
    train = _jsonl(tmp_path / "train.jsonl", rows)
    evals = _jsonl(tmp_path / "eval.jsonl", rows[:1])
    adapter = tmp_path / "adapter"
    job = _job(tmp_path / "finetune.yaml", model=MODEL, render=RENDER, epochs=32, **TRAINING)
    proc = run_cli("finetune", "--config", job, "--train", train, "--eval", evals, "--output", adapter)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"docpipe run --adapter {adapter}" in proc.stdout

    record = json.loads((adapter / "docpipe_finetune.json").read_text())
    losses = record["losses"]
    assert len(losses["train"]) == len(losses["eval"]) == 32
    assert losses["train"][-1] <= 0.5 * losses["train"][0], losses["train"]
    assert losses["eval"][-1] < losses["eval"][0]
    assert record["base_model"] == "tiny-random" and record["examples"]["train"] == 4
    assert len(record["examples"]["hash"]) == 64 and record["options"]["lora"]["rank"] == 16
    assert record["rendered_longest_edge"] == 448

    out = _run_with_adapter(tmp_path, [sample_docs / n for n in ("report.pdf", "minutes.pdf", "receipt.png",
                                                                  "fax.tiff")], adapter)
    texts = {(r["source_uri"], r["page_number"]): r["text"] for r in pq.read_table(out / "pages").to_pylist()}
    from docpipe.config import RunConfig
    from docpipe.tools.finetune import adapter_mismatches

    same = RunConfig(output="o", model=MODEL, render=RENDER)
    assert adapter_mismatches(str(adapter), same, 448) == []
    other = RunConfig(output="o", model={**MODEL, "do_image_splitting": True})
    [warning] = adapter_mismatches(str(adapter), other, 448)
    assert "image splitting False, this run uses True" in warning
    assert {(r["source_uri"], r["page_number"]): texts[(r["source_uri"], r["page_number"])] for r in rows} == {
        (r["source_uri"], r["page_number"]): r["text"] for r in rows}

    # The loop closes with docpipe eval, on the same rows as labels: no character wrong.
    proc = run_cli("eval", out, "--labels", train, "--json", tmp_path / "eval.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert scores["cer"] == 0 and scores["pages_scored"] == 4

    # The adapter is a plain PEFT adapter: it loads on the base model with PEFT directly.
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from docpipe.model.load import resolve_checkpoint

    base = AutoModelForImageTextToText.from_pretrained(resolve_checkpoint("tiny-random"))
    tuned = PeftModel.from_pretrained(base, str(adapter))
    adapted = {name for name, _ in tuned.named_modules() if name.endswith("lora_A")}
    assert adapted and all(".text_model.layers." in name for name in adapted)
    assert len(adapted) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)


def test_finetune_learns_an_extraction_and_run_with_the_adapter_writes_it(sample_docs, tmp_path):
    schema = "tests.extraction_models:PurchaseOrder"
    labels = {
        str(sample_docs / "receipt.png"): {"po_number": "PO 17", "supplier": "Cafe", "quantities": [3]},
        str(sample_docs / "scan.jpg"): {"po_number": "PO 90", "supplier": "Table", "quantities": [1, 2]},
    }
    # As documents rows carry it: the extraction as a JSON string (key order need not be the schema's).
    rows = [{"source_uri": uri, "extraction": json.dumps(dict(reversed(value.items()))), "schema": schema}
            for uri, value in labels.items()]
    train = _jsonl(tmp_path / "train.jsonl", rows)
    adapter = tmp_path / "adapter"
    job = _job(tmp_path / "finetune.yaml", model=MODEL, render=RENDER, epochs=16, **TRAINING)
    proc = run_cli("finetune", "--config", job, "--train", train, "--output", adapter)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = json.loads((adapter / "docpipe_finetune.json").read_text())["losses"]["train"]
    assert losses[-1] <= 0.5 * losses[0], losses

    out = _run_with_adapter(tmp_path, list(labels), adapter, task="extract",
                            extract={"schema": schema, "max_new_tokens": 48, "retry_temperature": 0})
    docs = {r["source_uri"]: r for r in pq.read_table(out / "documents").to_pylist()}
    for uri, value in labels.items():
        assert docs[uri]["valid"] is True, docs[uri]
        assert json.loads(docs[uri]["extraction"]) == value


def test_bad_examples_are_listed_before_training_and_can_be_skipped(sample_docs, tmp_path):
    schema = "tests.extraction_models:PurchaseOrder"
    rows = [
        {"source_uri": str(sample_docs / "receipt.png"), "page_number": 1, "text": "fine"},
        {"source_uri": str(tmp_path / "missing.pdf"), "page_number": 1, "text": "x"},
        {"source_uri": str(sample_docs / "report.pdf"), "page_number": 9, "text": "x"},
        {"source_uri": str(sample_docs / "corrupt.pdf"), "page_number": 1, "text": "x"},
        {"source_uri": str(sample_docs / "scan.jpg"), "extraction": '{"quantities": "many"}', "schema": schema},
        {"source_uri": str(sample_docs / "scan.jpg"), "page_number": 1, "text": None, "status": "error"},
    ]
    train = _jsonl(tmp_path / "train.jsonl", rows)
    proc = run_cli("finetune", "--train", train, "--output", tmp_path / "adapter", "--model", "tiny-random",
                   "--longest-edge", "448")
    assert proc.returncode == 2
    err = proc.stderr
    assert "5 example(s) can't be used" in err and "--skip-invalid" in err
    assert f"row 2 ({tmp_path / 'missing.pdf'}): cannot read" in err
    assert "row 3" in err and "page 9 out of range" in err and "has 3 pages" in err
    assert "row 4" in err and "unsupported_media_type" in err
    assert "row 5" in err and "not valid for schema PurchaseOrder: quantities" in err
    assert "row 6" in err and "has no text" in err
    assert "row 1 " not in err
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()

    from docpipe.config import FinetuneConfig
    from docpipe.tools.finetune import prepare_examples

    prepared = prepare_examples(FinetuneConfig(train=str(train), output=str(tmp_path / "a"), model=MODEL,
                                               render=RENDER, skip_invalid=True))
    assert prepared.skipped == 5 and [ex.answer for ex in prepared.train] == ["fine"]


def _adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_a_killed_run_resumes_from_its_last_checkpoint_to_the_same_adapter(sample_docs, tmp_path):
    import torch

    import pyarrow as pa

    rows = [{"source_uri": str(sample_docs / "receipt.png"), "page_number": 1, "text": "one"},
            {"source_uri": str(sample_docs / "scan.jpg"), "page_number": 1, "text": "two"}]
    train = tmp_path / "train.parquet"  # as a run's pages table holds them
    pq.write_table(pa.Table.from_pylist(rows), train)
    # Dropout on, so the resumed run must also restore the random state; a checkpoint every 2 steps and a
    # kill after step 3, so the resumed run redoes a step.
    job = _job(tmp_path / "finetune.yaml", model=MODEL, render=RENDER, epochs=3, learning_rate=1e-2,
               checkpoint_steps=2, lora={"dropout": 0.1})
    args = ("finetune", "--config", job, "--train", train)

    whole = tmp_path / "whole"
    assert run_cli(*args, "--output", whole).returncode == 0
    resumed = tmp_path / "resumed"
    killed = run_cli(*args, "--output", resumed, env={"DOCPIPE_FAULT_FINETUNE_EXIT": "3"})
    assert killed.returncode == 137
    assert not (resumed / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step-00000002"]
    again = run_cli(*args, "--output", resumed)
    assert again.returncode == 0, again.stderr[-3000:]

    record, reference = (json.loads((d / "docpipe_finetune.json").read_text()) for d in (resumed, whole))
    assert record["resumed_from"] == "step-00000002" and reference["resumed_from"] is None
    assert record["steps"] == 6 and len(record["losses"]["steps"]) == 6
    assert record["losses"]["train"] == pytest.approx(reference["losses"]["train"], rel=1e-4)
    a, b = _adapter_weights(resumed), _adapter_weights(whole)
    assert a.keys() == b.keys() and len(a) == 2 * 2 * 7
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    # Another run's checkpoints are not resumed by mistake.
    other = run_cli("finetune", "--config", job, "--train", train, "--output", resumed, "--epochs", "4")
    assert other.returncode == 2 and "checkpoint of another fine-tuning" in other.stderr


TWO_ROWS = [{"page_number": 1, "text": "one", "name": "receipt.png"}, {"page_number": 1, "text": "two words",
                                                                     "name": "scan.jpg"}]
# no dropout: the workers' random streams differ from one process's (the gradient-averaging test compares them)
TWO_OPTIONS = dict(model={**MODEL, "cpu_threads": None}, render=RENDER, epochs=2, learning_rate=1e-2,
                   lora={"dropout": 0.0})


@pytest.fixture(scope="module")
def two_worker_adapter(sample_docs, tmp_path_factory):
    """One Ray Train run with two workers over two examples, shared by the tests below (a Ray Train start is the
    costly part): (its folder, the training file)."""
    tmp = tmp_path_factory.mktemp("two-workers")
    rows = [{"source_uri": str(sample_docs / r["name"]), "page_number": r["page_number"], "text": r["text"]}
            for r in TWO_ROWS]
    train = _jsonl(tmp / "train.jsonl", rows)
    adapter = tmp / "two"
    proc = run_cli("finetune", "--config", _job(tmp / "two.yaml", **TWO_OPTIONS), "--train", train, "--output",
                   adapter, "--num-workers", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return adapter, train


@pytest.mark.ray
def test_two_ray_train_workers_on_the_cpu(two_worker_adapter):
    adapter, _ = two_worker_adapter
    record = json.loads((adapter / "docpipe_finetune.json").read_text())
    assert record["workers"] == 2 and record["steps"] == 2  # 2 examples a step, one on each worker

    from docpipe.config import ModelOptions
    from docpipe.model.load import load_model

    loaded = load_model(ModelOptions(**{**MODEL, "adapter": str(adapter)}))
    assert type(loaded.model).__name__ == "Idefics2ForConditionalGeneration"  # merged: a plain model again


@pytest.mark.ray
def test_two_ray_train_workers_average_their_gradients_to_the_one_worker_adapter(two_worker_adapter, tmp_path):
    """Two workers, one example each a step, DDP averaging their gradients: the adapter equals one worker's that
    takes both examples a step (gradient accumulation over 2, each loss halved: the same mean gradient). Workers
    that trained apart (no all-reduce) would each have followed one example, and rank 0 would save its own."""
    import torch

    two, train = two_worker_adapter
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    one = tmp_path / "one"
    proc = run_cli("finetune", "--config", _job(tmp_path / "one.yaml", **TWO_OPTIONS, gradient_accumulation_steps=2),
                   "--train", train, "--output", one)
    assert proc.returncode == 0, proc.stderr[-3000:]
    by_two, by_one = (json.loads((d / "docpipe_finetune.json").read_text()) for d in (two, one))
    assert (by_two["workers"], by_two["steps"]) == (2, 2) and (by_one["workers"], by_one["steps"]) == (1, 2)
    assert by_two["losses"]["train"] == pytest.approx(by_one["losses"]["train"], rel=1e-4)
    a, b = _adapter_weights(two), _adapter_weights(one)
    assert a.keys() == b.keys() and len(a) == 2 * 2 * 7
    assert any(t.abs().max() > 0 for k, t in a.items() if "lora_B" in k)  # trained: LoRA's B starts at zero
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key
    # and not an equality any adapter meets: one trained on the first example alone differs
    alone = tmp_path / "alone"
    only_first = _jsonl(tmp_path / "first.jsonl", rows[:1])
    proc = run_cli("finetune", "--config", _job(tmp_path / "alone.yaml", **TWO_OPTIONS), "--train", only_first,
                   "--output", alone)
    assert proc.returncode == 0, proc.stderr[-3000:]
    c = _adapter_weights(alone)
    assert any(not torch.allclose(a[key], c[key], rtol=1e-4, atol=1e-6) for key in a)


def test_config_schema_includes_the_finetune_options():
    proc = run_cli("config", "schema")
    schema = json.loads(proc.stdout)
    tune = schema["$defs"]["FinetuneConfig"]["properties"]
    assert tune["num_workers"]["description"] and "lora" in tune
    assert schema["$defs"]["LoraOptions"]["properties"]["rank"]["description"]
    alone = json.loads(run_cli("config", "schema", "--finetune").stdout)
    assert alone["additionalProperties"] is False and "train" in alone["required"]


def test_an_extraction_example_is_the_extraction_prompt_then_the_json_as_the_grammar_writes_it(tiny_model,
                                                                                                 sample_docs):
    from docpipe.config import ExtractOptions, FinetuneConfig, ModelOptions
    from docpipe.extract.stage import ExtractStage
    from docpipe.tools.finetune import IGNORE, encode, examples_from_rows, render_examples

    schema = "tests.extraction_models:PurchaseOrder"
    config = FinetuneConfig(train="t", output="o", model={"name": "tiny-random"}, extract={"schema": schema})
    row = {"source_uri": str(sample_docs / "receipt.png"), "extraction": '{"quantities": [2], "po_number": "A1"}'}
    [ex] = examples_from_rows([row], "t", config)
    render_examples([ex], config, 1960)
    assert ex.problem is None and ex.answer == '{"po_number":"A1","quantities":[2]}'  # schema order, compact
    inputs = encode(tiny_model, [ex], "cpu")
    ids, labels = inputs["input_ids"][0].tolist(), inputs["labels"][0].tolist()
    learned = [i for i, label in enumerate(labels) if label != IGNORE]
    tok = tiny_model.processor.tokenizer
    assert tok.decode(ids[learned[0]:learned[-1] + 1]) == ex.answer + "<end_of_utterance>"
    stage = ExtractStage(ModelOptions(name="tiny-random"), ExtractOptions(schema=schema), tiny_model)
    assert ids[: learned[0]] == list(tiny_model.processor(text=[stage.prompt(1)])["input_ids"][0])


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_cuda(), reason="needs a machine without CUDA; on a GPU tests/gpu/test_gpu.py runs a QLoRA step")
def test_qlora_without_a_gpu_is_a_clear_error(sample_docs, tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", [{"source_uri": str(sample_docs / "receipt.png"), "page_number": 1,
                                                "text": "x"}])
    proc = run_cli("finetune", "--train", train, "--output", tmp_path / "a", "--model", "tiny-random", "--qlora",
                   "--longest-edge", "448")
    assert proc.returncode == 2 and "QLoRA" in proc.stderr and "needs a CUDA GPU" in proc.stderr
