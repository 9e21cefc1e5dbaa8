"""The continuous engine: Idefics2 pages through transformers' continuous-batching manager.

transformers' manager (paged KV cache, a scheduler, CUDA graphs) takes token ids only. Images reach it
through a feature bank: each page's images are encoded by the model's own vision tower and perceiver
(``get_image_features``, batched by shape, apart from decoding), their rows are written into a
preallocated bank, and the page's ``<image>`` positions carry virtual ids ``vocab_size + row``. The text
model's embedding layer returns the bank row for such an id. A causal LM sharing the Idefics2 text
model and lm_head then decodes exactly what ``generate`` on the full model would.

- Prefix sharing is off: two pages' virtual ids must never alias through a shared cache block.
- The bank lookup has no data-dependent branch, so it never synchronises with the host and CUDA graphs
  can capture the decode step.
- Several threads may call ``generate`` at once (an actor with several calls in flight): each waits
  for its own requests while the manager batches everyone's. The bank's size bounds the pages in
  flight; a call that finds it full waits for rows to free up.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from pipeline.engine import Generation


def _bank_embedding(embed, bank):
    import torch
    from torch import nn

    class _BankEmbedding(nn.Module):
        """Token embeddings for ids below the vocabulary; bank rows for ids at or above it."""

        def __init__(self):
            super().__init__()
            self.embed = embed
            self.vocab = embed.num_embeddings
            self.register_buffer("bank", bank, persistent=False)

        @property
        def weight(self):  # tied-weight and resize helpers look for it
            return self.embed.weight

        @property
        def num_embeddings(self):
            return self.vocab

        def forward(self, ids):
            virtual = ids >= self.vocab
            text = self.embed(torch.where(virtual, torch.zeros_like(ids), ids))
            rows = self.bank[torch.where(virtual, ids - self.vocab, torch.zeros_like(ids))]
            return torch.where(virtual.unsqueeze(-1), rows.to(text.dtype), text)

    return _BankEmbedding()


class UnsupportedModel(Exception):
    """The checkpoint is not one the continuous engine can serve; the reason says why."""


@dataclass
class _Pending:
    future: Future
    rows: range
    forced: bool  # no stop tokens: the page runs to its max_new_tokens, whatever it emits


class ContinuousEngine:
    name = "continuous"
    streams = True  # pages are queued and collected apart: a call never waits for a whole batch to decode

    def __init__(self, loaded, opts, stop_ids: list[int], pad_id: int, pages_in_flight: int):
        import torch
        from transformers import AutoModelForCausalLM

        self.m, self.opts, self.stop_ids = loaded, opts, stop_ids
        model = loaded.model
        inner = getattr(model, "model", None)
        text_model = getattr(inner, "text_model", None)
        if text_model is None or not hasattr(inner, "get_image_features") or not hasattr(model, "lm_head"):
            raise UnsupportedModel(f"{type(model).__name__} has no separate text model, image encoder and "
                                   "lm_head to serve through a feature bank")
        text_config = model.config.text_config
        self.image_token_id = model.config.image_token_id
        self.vocab = text_model.embed_tokens.num_embeddings
        self.rows_per_image = model.config.perceiver_config.resampler_n_latents
        splitting = getattr(loaded.processor.image_processor, "do_image_splitting", False)
        self.rows_per_page = self.rows_per_image * (5 if splitting else 1)
        capacity = self.rows_per_page * max(1, pages_in_flight)
        self.bank = torch.zeros(capacity, text_config.hidden_size, dtype=loaded.dtype, device=loaded.device)
        self._free = [range(0, capacity)]  # free row ranges
        self._rows_freed = threading.Condition()
        self.pages_in_flight = 0
        self.peak_pages_in_flight = 0

        # A causal-LM shell on the meta device (no memory), given the Idefics2 text model's own modules.
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(text_config)
        lm.model = text_model
        lm.lm_head = model.lm_head
        self.lm = lm
        self._original_embed = text_model.embed_tokens
        text_model.embed_tokens = _bank_embedding(self._original_embed, self.bank)
        try:
            self._start(loaded, opts, stop_ids, pad_id, pages_in_flight)
        except Exception:
            self.close()  # the text model gets its own embedding back: generate still works
            raise

    def _start(self, loaded, opts, stop_ids: list[int], pad_id: int, pages_in_flight: int) -> None:
        from transformers import ContinuousBatchingConfig, GenerationConfig

        from pipeline.model import chat_prompt

        lm = self.lm
        lm.generation_config = GenerationConfig(do_sample=False, max_new_tokens=opts.max_new_tokens,
                                                eos_token_id=stop_ids, pad_token_id=pad_id)
        lm.eval()
        cuda = loaded.device == "cuda"
        quantized = opts.quantization != "none"
        # The KV cache is sized for the pages the bank admits, not for all free memory (transformers' default,
        # which on a CPU is most of the host's RAM).
        prompt = len(loaded.processor(text=[chat_prompt(loaded.processor, 1, opts.prompt)])["input_ids"][0])
        page_size = 256
        blocks_per_page = -(-(prompt + opts.max_new_tokens) // page_size) + 1
        cb = ContinuousBatchingConfig(
            allow_block_sharing=False,
            page_size=page_size,
            num_blocks=blocks_per_page * max(1, pages_in_flight),
            max_requests_per_batch=max(1, pages_in_flight),
            # Tokens per forward pass: a few prefills at a time on a CPU; transformers' default on a GPU.
            max_batch_tokens=None if cuda else 2 * prompt,
            # bitsandbytes kernels are not graph-capturable: those weights decode eagerly.
            use_cuda_graph=cuda and not quantized,
            default_compile_level=0,
        )
        self.note = "bitsandbytes weights: no CUDA graphs" if cuda and quantized else ""
        try:  # sizes the per-request block table (transformers >= 5.2x; older ones size it themselves)
            from transformers.generation.continuous_batching.utils import WorkloadHints

            hints = {"workload_hints": WorkloadHints(max_prompt_length=prompt, max_generated_length=opts.max_new_tokens,
                                                     num_requests=max(1, pages_in_flight))}
        except ImportError:
            hints = {}
        self.manager = lm.init_continuous_batching(generation_config=lm.generation_config,
                                                   continuous_batching_config=cb, **hints)
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._counter = 0
        if cuda:
            self.manager.warmup()  # captures the CUDA graphs: where a GPU would fail, it fails here
        # Started from a daemon thread, so its generation thread is one too (threads inherit it): a non-daemon
        # loop kept model actors alive after their run ended (seen: two orphaned CPU actors of 8 GB each).
        starter = threading.Thread(target=self.manager.start, daemon=True)
        starter.start()
        starter.join()
        self._stop = threading.Event()
        self._dispatcher = threading.Thread(target=self._dispatch, name="docpipe-cb-results", daemon=True)
        self._dispatcher.start()

    # ---------------------------------------------------------------------------------------- requests
    def submit(self, inputs: dict[str, Any], max_new_tokens: list[int], forced: bool = False
               ) -> list[Future | Exception]:
        """Processor output for a batch of pages in: encode its images and queue its pages, and return at once;
        ``wait`` gives one Generation per page (or the exception that page raised). Raises if the vision encoder
        fails; a page that can't be queued gets its exception in its place. ``forced``: stopping off, every page
        runs to its own max_new_tokens (benchmarks)."""
        import torch

        with torch.inference_mode():
            features = self.m.model.get_image_features(
                pixel_values=inputs["pixel_values"], pixel_attention_mask=inputs.get("pixel_attention_mask")
            ).pooler_output
        ids, mask = inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()
        results: list[Future | Exception] = []
        for row_ids, row_mask, feats, cap in zip(ids, mask, features, max_new_tokens):
            prompt = [t for t, keep in zip(row_ids, row_mask) if keep]  # the processor pads on the left
            try:
                results.append(self._submit(prompt, feats, cap, forced))
            except Exception as exc:
                results.append(exc)
        return results

    @staticmethod
    def wait(handles: list) -> list[Generation | Exception]:
        out = []
        for r in handles:
            if isinstance(r, Future):
                try:
                    r = r.result()
                except Exception as exc:
                    r = exc
            out.append(r)
        return out

    def _submit(self, prompt: list[int], features, max_new_tokens: int, forced: bool) -> Future:
        import torch

        positions = [i for i, t in enumerate(prompt) if t == self.image_token_id]
        if len(positions) != features.shape[0]:
            raise ValueError(f"{len(positions)} image positions in the prompt for {features.shape[0]} feature rows")
        rows = self._take_rows(len(positions))
        try:
            self.bank[rows.start : rows.stop].copy_(features.to(self.bank.dtype))
            if self.bank.is_cuda:  # the manager's loop may read the bank from another stream: the rows must be there
                torch.cuda.current_stream().synchronize()
            for pos, row in zip(positions, rows):
                prompt[pos] = self.vocab + row
            future: Future = Future()
            with self._lock:
                request_id = f"page-{self._counter}"
                self._counter += 1
                self._pending[request_id] = _Pending(future, rows, forced)
            queued = self.manager.add_request(prompt, request_id=request_id, max_new_tokens=max_new_tokens,
                                              eos_token_id=-1 if forced else self.stop_ids)
            if queued is None:  # the manager is stopping or failed: it dropped the page (and only logged it)
                raise RuntimeError("the continuous-batching manager refused the page: "
                                   + (self.manager.background_thread_status.can_accept_new_requests() or "stopped"))
        except Exception:
            with self._lock:
                self._pending = {k: p for k, p in self._pending.items() if p.rows != rows}
            self._give_rows(rows)
            raise
        return future

    def _dispatch(self) -> None:
        while not self._stop.is_set():
            result = self.manager.get_result(timeout=0.1)
            if result is None:
                if not self.manager.is_running() and self._pending:
                    self._fail_all(RuntimeError("the continuous-batching loop stopped"))
                continue
            if not result.is_finished():
                continue
            with self._lock:
                pending = self._pending.pop(result.request_id, None)
            if pending is None:
                continue
            self._give_rows(pending.rows)
            if result.error is not None:
                pending.future.set_exception(RuntimeError(result.error))
            else:
                tokens = list(result.generated_tokens)
                pending.future.set_result(Generation(tokens, "length") if pending.forced
                                          else Generation.from_tokens(tokens, self.stop_ids))

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for p in pending:
            self._give_rows(p.rows)
            p.future.set_exception(error)

    # ---------------------------------------------------------------------------------------- the bank
    def _take_rows(self, n: int) -> range:
        if n > self.bank.shape[0]:
            raise ValueError(f"a page with {n} image rows exceeds the feature bank ({self.bank.shape[0]} rows)")
        with self._rows_freed:
            while True:
                for i, free in enumerate(self._free):
                    if len(free) >= n:
                        self._free[i] = range(free.start + n, free.stop)
                        self.pages_in_flight += 1
                        self.peak_pages_in_flight = max(self.peak_pages_in_flight, self.pages_in_flight)
                        return range(free.start, free.start + n)
                self._rows_freed.wait()

    def _give_rows(self, rows: range) -> None:
        with self._rows_freed:
            merged = sorted([r for r in self._free if len(r)] + [rows], key=lambda r: r.start)
            self._free = []
            for r in merged:  # coalesce neighbours, so a full-page range fits again
                if self._free and self._free[-1].stop == r.start:
                    self._free[-1] = range(self._free[-1].start, r.stop)
                else:
                    self._free.append(r)
            self.pages_in_flight -= 1
            self._rows_freed.notify_all()

    def close(self) -> None:
        """Stop the manager and give the text model its own embedding back (generate can use it again)."""
        if hasattr(self, "_stop"):
            self._stop.set()
        manager = getattr(self, "manager", None)
        if manager is not None and manager.is_running():
            manager.stop(block=True, timeout=10)
        self.lm.model.embed_tokens = self._original_embed
