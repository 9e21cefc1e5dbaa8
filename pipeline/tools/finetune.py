"""Fine-tuning: reviewed rows in, a LoRA adapter out, loadable with ``docpipe run --adapter``.

Examples are rows in the shape runs write (pages rows for OCR, documents rows for extraction), so
corrected output is training data as it stands. Their pages are read and rendered by the run's own
code (``expand_document``, at ``render_edge_for``'s size), preprocessed by the run's ``model_inputs``
and prompted with the run's ``chat_prompt``: training sees exactly what inference will.

The loop is plain torch with transformers' ``get_scheduler``, rather than transformers' Trainer: the same
short loop runs in this process and inside Ray Train's workers (the wiring is in pipeline/execute/train.py),
and its checkpoints hold everything a killed run needs to end with the adapter an uninterrupted run
would have written (adapter weights, optimizer, schedule, random states, position in the epoch).
torch, transformers and peft are imported inside functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from docpipe.config import FinetuneConfig
from docpipe.errors import ConfigError, ExamplesError, describe

RECORD = "docpipe_finetune.json"  # written beside the adapter: base model, options, examples' hash, losses
CHECKPOINTS = "checkpoints"
STATE = "trainer_state.pt"
IGNORE = -100  # label of a position the loss skips
SHOWN_ERRORS = 20


@dataclass
class Example:
    where: str  # "FILE row N", for error messages
    source_uri: str
    kind: str  # "ocr" (a page and its text) or "extract" (a document's pages and its JSON)
    answer: str
    instruction: str = ""
    page_numbers: list[int] = field(default_factory=list)
    images: list[tuple[bytes, str, int, int]] = field(default_factory=list)  # (data, codec, width, height)
    problem: str | None = None  # why it can't be used


@dataclass
class Prepared:
    train: list[Example]
    eval: list[Example]
    skipped: int
    examples_hash: str
    longest_edge: int


# ---------------------------------------------------------------- examples


def read_rows(path: str, storage=None) -> list[dict[str, Any]]:
    """Rows of a JSONL file (one object a line) or a Parquet file or folder (e.g. a run's OUT/pages)."""
    from docpipe.storage import read_bytes, resolve

    try:
        if path.endswith((".jsonl", ".ndjson", ".json")):
            rows = []
            for number, line in enumerate(read_bytes(path, storage).decode().splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as exc:
                        raise ExamplesError(f"{path} line {number}: not JSON: {exc}") from None
            return rows
        import pyarrow.parquet as pq

        fs, where = resolve(path, storage)
        return pq.read_table(where, filesystem=fs).to_pylist()
    except ExamplesError:
        raise
    except Exception as exc:
        raise ExamplesError(f"cannot read examples {path}: {describe(exc)}") from None


def examples_from_rows(rows: list[dict[str, Any]], path: str, config: FinetuneConfig, ocr_prompt: str | None = None,
                       doctags: bool = False) -> list[Example]:
    """Pages rows become OCR examples, documents rows with an extraction become extraction examples; the
    extraction is validated against its schema and written as the grammar makes the model write it.
    ``ocr_prompt``: the model's (default: the options'); ``doctags``: the model answers in DocTags, so a page's
    answer is its blocks written as DocTags (a row without blocks can't teach it)."""
    from docpipe.extract.schema import canonical_json, instruction, load_schema

    schemas: dict[str, Any] = {}
    out = []
    for index, row in enumerate(rows, 1):
        where = f"{path} row {index}"
        uri = row.get("source_uri")
        if not isinstance(uri, str) or not uri:
            out.append(Example(where, str(uri), "?", "", problem="no source_uri"))
        elif row.get("extraction") is not None:
            ex = Example(where, uri, "extract", "")
            spec_name = config.extract.schema_spec or row.get("schema") or row.get("schema_name")
            try:
                if not spec_name:
                    raise ConfigError("no schema: give --schema, or a 'schema' key in the row")
                if spec_name not in schemas:
                    schemas[spec_name] = load_schema(spec_name)
                spec = schemas[spec_name]
                value = json.loads(row["extraction"]) if isinstance(row["extraction"], str) else row["extraction"]
                errors = spec.validate(value)
                if errors:
                    ex.problem = f"extraction not valid for schema {spec.name}: {'; '.join(errors[:3])}"
                else:
                    ex.answer, ex.instruction = canonical_json(value, spec.json_schema), instruction(spec, config.extract)
            except ValueError as exc:
                ex.problem = f"extraction is not JSON: {exc}"
            except ConfigError as exc:
                ex.problem = str(exc)
            out.append(ex)
        elif "page_number" in row:
            ex = Example(where, uri, "ocr", row.get("text") or "", config.model.prompt if ocr_prompt is None
                         else ocr_prompt)
            number = row.get("page_number")
            if not isinstance(number, int) or isinstance(number, bool) or number < 1:
                ex.problem = f"page_number must be a positive integer, got {number!r}"
            elif not isinstance(row.get("text"), str):
                ex.problem = f"page {number} has no text (status {row.get('status')!r})"
            elif doctags and not row.get("blocks"):
                ex.problem = (f"page {number} has no blocks: the model answers in DocTags, which are written from a "
                              "page's blocks (their kinds and boxes)")
            else:
                ex.page_numbers = [number]
                if doctags:
                    from docpipe.model.families.doctags import blocks_to_doctags

                    ex.answer = blocks_to_doctags(row["blocks"])
            out.append(ex)
        else:
            out.append(Example(where, uri, "?", "", problem="neither a pages row (page_number, text) nor a "
                               "documents row (extraction)"))
    return out


def render_examples(examples: list[Example], config: FinetuneConfig, longest_edge: int) -> None:
    """Render each example's pages with the run's own code, at the run's size; what can't be read or is out
    of range becomes the example's problem. Each document is opened once."""
    from docpipe.render.document import expand_document
    from docpipe.records import DOCUMENT, PAGE

    by_uri: dict[str, list[Example]] = {}
    for ex in examples:
        if ex.problem is None:
            by_uri.setdefault(ex.source_uri, []).append(ex)
    for uri, group in by_uri.items():
        whole = any(ex.kind == "extract" for ex in group)
        wanted = {n for ex in group for n in ex.page_numbers}
        pages: dict[int, Any] = {}
        count = 0
        records = expand_document(uri, config.render, longest_edge, config.storage, ocr=True)
        for rec in records:
            if rec["kind"] == DOCUMENT:
                if rec["status"] != "ok":
                    for ex in group:
                        ex.problem = f"cannot read {uri}: {rec.get('error_type')}: {rec.get('error_message')}"
                    break
                count = rec["page_count"]
                if not whole and not wanted & set(range(1, count + 1)):
                    break
            elif rec["kind"] == PAGE:
                pages[rec["page_number"]] = rec
                if not whole and wanted <= set(pages):
                    break
        records.close()
        for ex in group:
            if ex.problem:
                continue
            if ex.kind == "extract":
                if count > config.extract.page_cap:
                    ex.problem = (f"{count} pages, over page_cap {config.extract.page_cap}: a longer document is "
                                  "extracted per chunk, so its merged JSON is no one prompt's answer")
                    continue
                ex.page_numbers = list(range(1, count + 1))
            for number in ex.page_numbers:
                rec = pages.get(number)
                if number > count:
                    ex.problem = f"page {number} out of range ({uri} has {count} pages)"
                elif rec is None or rec["status"] != "ok":
                    ex.problem = f"page {number} of {uri} did not render: {(rec or {}).get('error_message')}"
                else:
                    ex.images.append((rec["image"], rec["image_codec"], rec["width"], rec["height"]))
                    continue
                ex.images = []
                break


def examples_hash(train: list[Example], evals: list[Example]) -> str:
    """SHA-256 over what is learned from: each example's rendered pages, instruction and answer, in order."""
    h = hashlib.sha256()
    for name, group in (("train", train), ("eval", evals)):
        h.update(name.encode())
        for ex in group:
            for part in (ex.source_uri, ex.kind, ex.instruction, ex.answer, json.dumps(ex.page_numbers)):
                h.update(part.encode() + b"\0")
            for data, codec, w, h_ in ex.images:
                h.update(hashlib.sha256(data).digest() + f"{codec}:{w}x{h_}".encode())
    return h.hexdigest()


def prepare_examples(config: FinetuneConfig) -> Prepared:
    """Read, validate and render every example before any training: all problems are listed at once, or,
    with skip_invalid, the examples that have them are dropped and counted."""
    from docpipe.model.load import family_for_checkpoint, model_options, render_edge_for, resolve_checkpoint

    if config.model.adapter:
        raise ConfigError("model.adapter is set: fine-tuning trains a new adapter on the base model")
    checkpoint = resolve_checkpoint(config.model.name)
    longest_edge = config.render.longest_edge or render_edge_for(checkpoint, config.model)
    family = family_for_checkpoint(checkpoint)  # its OCR prompt and output format, as runs use them
    ocr_prompt = model_options(config.model, family).prompt
    sets = {}
    for name, path in (("train", config.train), ("eval", config.eval)):
        examples = examples_from_rows(read_rows(path, config.storage), path, config, ocr_prompt,
                                      family.output == "doctags") if path else []
        render_examples(examples, config, longest_edge)
        sets[name] = examples
    bad = [ex for group in sets.values() for ex in group if ex.problem]
    if bad and not config.skip_invalid:
        lines = [f"  {ex.where} ({ex.source_uri}): {ex.problem}" for ex in bad[:SHOWN_ERRORS]]
        more = f"\n  ... and {len(bad) - SHOWN_ERRORS} more" if len(bad) > SHOWN_ERRORS else ""
        raise ExamplesError(f"{len(bad)} example(s) can't be used (--skip-invalid drops them):\n"
                            + "\n".join(lines) + more)
    train = [ex for ex in sets["train"] if not ex.problem]
    evals = [ex for ex in sets["eval"] if not ex.problem]
    if not train:
        raise ExamplesError(f"no usable training examples in {config.train}")
    return Prepared(train, evals, len(bad), examples_hash(train, evals), longest_edge)


def adapter_mismatches(adapter: str, run, longest_edge: int) -> list[str]:
    """How a run's options differ from those its adapter (a docpipe_finetune.json beside it) was trained with,
    in what shapes the model's input: page size, image splitting, prompts, base model. Empty when they match,
    or when the adapter has no record (trained elsewhere)."""
    record_path = Path(adapter) / RECORD
    if not record_path.is_file():
        return []
    record = json.loads(record_path.read_text())
    trained = record.get("options", {})
    model, extract = trained.get("model", {}), trained.get("extract", {})
    checks = [
        ("base model", record.get("base_model"), run.model.name),
        ("rendered page size (longest_edge)", record.get("rendered_longest_edge"), longest_edge),
        ("image splitting", model.get("do_image_splitting"), run.model.do_image_splitting),
        ("OCR prompt", model.get("prompt"), run.model.prompt),
        ("extraction prompt", extract.get("prompt"), run.extract.prompt),
    ]
    return [f"adapter {adapter} was trained with {what} {was!r}, this run uses {now!r}: the model sees other "
            "inputs than it was tuned on" for what, was, now in checks if was != now]


# ---------------------------------------------------------------- batches and labels


EOU = "<end_of_utterance>"  # Idefics2's end of turn; each family's is its chat template's (Family.end_of_turn)


def answer_text(processor, ex: Example, prompt: str, end: str = EOU) -> str:
    """What follows the prompt, as inference produces it, up to and including the token ``end`` that closes the
    turn (<end_of_utterance>, <|end_of_text|>, <|im_end|>: the model family's). OCR: the chat template's assistant
    turn (Idefics2's free text follows the cue after a space; runs strip it). Extraction: the JSON straight after
    the cue, since the grammar allows no whitespace before it (a space learned there would be a token the grammar
    forbids at the first step)."""
    from docpipe.model.load import chat_prompt

    if ex.kind == "extract":
        return ex.answer + end
    full = chat_prompt(processor, len(ex.images), ex.instruction, ex.answer)
    if not full.startswith(prompt) or end not in full[len(prompt):]:
        raise ValueError("the chat template's answer turn does not extend the inference prompt")
    rest = full[len(prompt):]
    return rest[: rest.index(end) + len(end)]


def answer_ids(processor, prompt: str, prompt_ids: list[int], text: str, tokenize=None) -> list[int]:
    """The answer's tokens after the prompt's: as the tokenizer splits them in context, unless that merges
    tokens across the boundary (then the prompt's tokens would differ from inference's), else on their own.
    ``tokenize``: a whole prompt's ids as the model family builds them (its images expanded); default: the
    processor's text half (Idefics2's expands <image> without the image)."""
    joined = list(tokenize(prompt + text) if tokenize else processor(text=[prompt + text])["input_ids"][0])
    if joined[: len(prompt_ids)] == prompt_ids:
        return joined[len(prompt_ids) :]
    return list(processor.tokenizer(text, add_special_tokens=False)["input_ids"])


def encode(m, examples: list[Example], processor_device: str) -> dict[str, Any]:
    """Model inputs with labels for a batch: each row is the prompt exactly as a run's model stage gets it
    (``chat_prompt``, ``decode_page`` and ``model_inputs``: the same tokens and pixels), then the answer's
    tokens; rows are padded on the right, so every row's positions start at 0 as in generation.

    Labels teach only the answer: every position is IGNORE except the answer's tokens and the end-of-turn token
    that closes it (the family's: <end_of_utterance>, granite's <|end_of_text|>, ChatML's <|im_end|>). Padding and
    the user turn (its image placeholders included) and the assistant's cue are all IGNORE."""
    import torch

    from docpipe.model.load import chat_prompt
    from docpipe.ocr import decode_page, model_inputs

    processor = m.processor
    tok = processor.tokenizer
    prompts = [chat_prompt(processor, len(ex.images), ex.instruction) for ex in examples]
    pixels = [[decode_page(*img) for img in ex.images] for ex in examples]
    inputs = model_inputs(m, prompts, pixels, processor_device)
    family = m.family
    end = family.end_of_turn()
    eou = tok.convert_tokens_to_ids(end)
    never = family.never_learned()
    rows, spans = [], []
    for r, (ex, prompt) in enumerate(zip(examples, prompts)):
        ids = inputs["input_ids"][r][inputs["attention_mask"][r].bool()].tolist()  # the prompt without padding
        tokenize = None if family.expands_without_images else (
            lambda text, px=pixels[r]: model_inputs(m, [text], [px], "cpu")["input_ids"][0].tolist())
        answer = answer_ids(processor, prompt, ids, answer_text(processor, ex, prompt, end), tokenize)
        if not answer or answer[-1] != eou:
            raise ValueError(f"{ex.where}: the answer's tokens do not end with {end}")
        rows.append(ids + answer)
        spans.append((len(ids), len(ids) + len(answer)))
    width = max(map(len, rows))
    pad = tok.pad_token_id if tok.pad_token_id is not None else eou
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for r, (row, (first, end)) in enumerate(zip(rows, spans)):
        input_ids[r, : len(row)] = torch.tensor(row)
        attention[r, : len(row)] = 1
        labels[r, first:end] = input_ids[r, first:end]
    for token in never:  # an answer that spells out "<image>" must not teach image tokens
        labels[input_ids == token] = IGNORE
    inputs.update(input_ids=input_ids.to(m.device), attention_mask=attention.to(m.device), labels=labels.to(m.device))
    return inputs


# ---------------------------------------------------------------- training


def _target_modules(names: list[str], decoder: str = "text_model") -> str:
    """A PEFT regex that adapts only the text model's attention and MLP projections (the vision tower and the
    connector use some of the same names); ``decoder``: the family's name for it (LightOnOCR: language_model)."""
    import re

    alternatives = "|".join(re.escape(n) for n in names)
    return rf".*{decoder}\.layers\.\d+\.(self_attn|mlp)\.({alternatives})"


def _load_for_training(config: FinetuneConfig):
    import torch

    from docpipe.model.load import load_model, pick_device

    if config.model.quantization != "none" and pick_device() != "cuda":
        raise ConfigError("QLoRA (model.quantization 4bit/8bit, --qlora) needs a CUDA GPU: bitsandbytes "
                          "quantises on the GPU")
    m = load_model(config.model)  # as runs load it: dtype (bf16 where the GPU has it), attention, quantisation
    torch.set_grad_enabled(True)  # load_model turns autograd off for inference
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = m.model
    if config.model.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    if config.gradient_checkpointing:
        # Non-reentrant: gradients reach the adapters without the inputs needing them.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.x on
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    lora = LoraConfig(r=config.lora.rank, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=_target_modules(config.lora.target_modules, m.family.decoder), bias="none")
    torch.manual_seed(config.seed)  # the adapter's initial weights
    m.model = get_peft_model(model, lora)
    if not any(p.requires_grad for p in m.model.parameters()):
        raise ConfigError(f"no module of the text model matches lora.target_modules {config.lora.target_modules}")
    return m


def _fingerprint(config: FinetuneConfig, examples_hash: str) -> str:
    """What must match for a checkpoint to be resumed: the options that shape training, and the examples."""
    keep = config.model_dump(mode="json", exclude={"resume", "num_workers", "skip_invalid", "output", "storage"})
    return hashlib.sha256(json.dumps([keep, examples_hash], sort_keys=True).encode()).hexdigest()


def _order(n: int, epoch: int, seed: int, world: int, rank: int, batch_size: int) -> list[list[int]]:
    """This worker's batches for an epoch: a seeded shuffle, padded by wrapping so every worker gets as many
    batches (DistributedSampler's rule), split rank by rank."""
    import torch

    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    per_step = world * batch_size
    while len(order) % per_step:
        order.append(order[len(order) % n])
    mine = order[rank::world]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def _latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / CHECKPOINTS).glob("step-*/" + STATE))
    return found[-1].parent if found else None


def _save_checkpoint(out: Path, model, optimizer, scheduler, state: dict[str, Any], keep: int = 2) -> None:
    """Written to a temporary folder and renamed: a run killed while saving leaves the previous one whole."""
    import shutil

    import torch
    from peft import get_peft_model_state_dict

    folder = out / CHECKPOINTS / f"step-{state['step']:08d}"
    tmp = out / CHECKPOINTS / f".tmp-{folder.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save({"adapter": get_peft_model_state_dict(model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rng, **state}, tmp / STATE)
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)
    for old in sorted((out / CHECKPOINTS).glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _maybe_exit(step: int) -> None:
    """Fault injection for tests: DOCPIPE_FAULT_FINETUNE_EXIT=K ends the process abruptly after optimizer step K,
    as a killed or preempted job would stop."""
    if os.environ.get("DOCPIPE_FAULT_FINETUNE_EXIT") == str(step):
        os._exit(137)


def mean_loss(model, m, examples: list[Example], batch_size: int, processor_device: str) -> float:
    """Average of the batches' losses, without dropout or gradients."""
    import torch

    was_training = model.training
    model.eval()
    losses = []
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            losses.append(float(model(**encode(m, examples[i : i + batch_size], processor_device)).loss))
    model.train(was_training)
    return sum(losses) / len(losses)


def train(config: FinetuneConfig, prepared: Prepared) -> dict[str, Any]:
    """Train the adapter and write it to ``config.output``; returns the record written beside it.

    Runs alone, or as one worker of a torch.distributed group (Ray Train sets that up): then each worker
    takes its share of every step's examples, DDP averages the gradients, and worker 0 writes checkpoints
    and the adapter (the output must be a folder every worker can reach).
    """
    import random

    import numpy as np
    import torch
    import torch.distributed as dist
    from peft import set_peft_model_state_dict
    from transformers import get_scheduler

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(config.seed)
    np.random.seed(config.seed)
    m = _load_for_training(config)
    peft_model = m.model
    model = peft_model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(peft_model, device_ids=[torch.cuda.current_device()] if m.device == "cuda"
                                        else None)
    processor_device = m.device if config.model.processor_device == "model" else "cpu"

    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    batches_per_epoch = len(_order(len(prepared.train), 0, config.seed, world, rank, config.batch_size))
    accum = config.gradient_accumulation_steps
    steps_per_epoch = -(-batches_per_epoch // accum)
    total_steps = steps_per_epoch * config.epochs
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=int(config.warmup_ratio * total_steps),
                              num_training_steps=total_steps)

    fingerprint = _fingerprint(config, prepared.examples_hash)
    state: dict[str, Any] = {"step": 0, "fingerprint": fingerprint, "step_losses": [], "epoch_sums": [0.0, 0],
                             "train_loss": [], "eval_loss": []}
    resumed_from = None
    last = _latest_checkpoint(out) if config.resume else None
    if last is not None:
        saved = torch.load(last / STATE, map_location="cpu", weights_only=False)
        if saved["fingerprint"] != fingerprint:
            raise ConfigError(f"{last} is a checkpoint of another fine-tuning (other options or examples): use "
                              "another --output, or --no-resume to start over")
        set_peft_model_state_dict(peft_model, saved.pop("adapter"))
        optimizer.load_state_dict(saved.pop("optimizer"))
        scheduler.load_state_dict(saved.pop("scheduler"))
        rng = saved.pop("rng")
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        state = saved
        resumed_from = last.name

    model.train()
    t0 = time.perf_counter()
    while state["step"] < total_steps:
        epoch, in_epoch = divmod(state["step"], steps_per_epoch)
        batches = _order(len(prepared.train), epoch, config.seed, world, rank, config.batch_size)
        group = batches[in_epoch * accum : (in_epoch + 1) * accum]
        for i, indices in enumerate(group):
            inputs = encode(m, [prepared.train[j] for j in indices], processor_device)
            sync = i == len(group) - 1 or not distributed  # DDP: all-reduce gradients once per optimizer step
            with contextlib.nullcontext() if sync else model.no_sync():
                loss = model(**inputs).loss
                (loss / len(group)).backward()
            value = float(loss.detach())
            state["epoch_sums"][0] += value
            state["epoch_sums"][1] += 1
            state["step_losses"].append(round(value, 6))
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        if state["step"] % steps_per_epoch == 0:  # an epoch ends: its mean training loss, and the eval loss
            total, count = state["epoch_sums"]
            epoch_loss = torch.tensor([total, float(count)])
            if distributed:
                dist.all_reduce(epoch_loss)
            state["train_loss"].append(round(float(epoch_loss[0] / epoch_loss[1]), 6))
            state["epoch_sums"] = [0.0, 0]
            if prepared.eval:
                state["eval_loss"].append(round(mean_loss(peft_model, m, prepared.eval, config.batch_size,
                                                          processor_device), 6))
        if rank == 0 and (state["step"] % config.checkpoint_steps == 0 or state["step"] % steps_per_epoch == 0):
            _save_checkpoint(out, peft_model, optimizer, scheduler, state)
        if distributed:
            dist.barrier()  # no worker runs ahead of a checkpoint being written
        _maybe_exit(state["step"])

    record = {
        "base_model": config.model.name,
        "examples": {"train": len(prepared.train), "eval": len(prepared.eval), "skipped_invalid": prepared.skipped,
                     "hash": prepared.examples_hash},
        "losses": {"train": state["train_loss"], "eval": state["eval_loss"], "steps": state["step_losses"]},
        "steps": total_steps,
        "workers": world,
        "device": m.device,
        "resumed_from": resumed_from,
        "train_s_this_process": round(time.perf_counter() - t0, 3),
        "rendered_longest_edge": prepared.longest_edge,
        "options": config.model_dump(mode="json"),
    }
    if rank == 0:
        peft_model.save_pretrained(out)
        (out / RECORD).write_text(json.dumps(record, indent=2))
    return record
