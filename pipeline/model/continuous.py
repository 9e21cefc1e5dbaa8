"""The continuous engine: pages through transformers' continuous-batching manager.

transformers' manager (paged KV cache, a scheduler, CUDA graphs) takes token ids only. Images reach it
through a feature bank: each page's images are encoded by the model's own vision tower and connector
(``get_image_features``, batched by shape, apart from decoding), their rows are written into a
preallocated bank, and the page's image-token positions carry virtual ids ``vocab_size + row``. A causal-LM
shell (its own layers and config, the text model's weights and lm_head) embeds such an id as the bank
row and then decodes exactly what ``generate`` on the full model would. The text model is never changed.
What differs per model family (the decoder, the image features, a page's most image tokens, the prompt's length)
is asked of the model's family (pipeline/model/families/): the bank holds a page's features at their largest.

- Prefix sharing is off: two pages' virtual ids must never alias through a shared cache block.
- The bank lookup has no data-dependent branch, so it never synchronises with the host and CUDA graphs
  can capture the decode step.
- Several threads may submit at once (an actor with several calls in flight): each waits for its own
  requests while the manager batches everyone's. The bank's size bounds the pages in flight; a call that
  finds it full waits for rows to free up. On a GPU the bank is sized from memory (pipeline/model/sizing.py).
- The start sends one real request through the running loop; a loop that later stops or stalls fails its
  pages in flight with LoopDied at once, and the OCR stage decodes them with generate.
- Works on transformers 5.17 and later (make test checks the floor): the cache block's name and the shape of
  the image features differ across releases.
- Attention: flash-attn's own paged kernels when the model loaded with them; else, on CUDA, PyTorch's own
  FlashAttention kernels (pipeline/model/attention.py); else transformers' packed sdpa, whose cost grows with the
  square of the pages in flight (they are capped for it: pipeline/model/sizing.py).
- Streams: pages are processed and encoded on a stream of their own, so the loop's steps (their host copies and
  syncs on the loop thread's stream) never wait behind encode work, and decoding overlaps encoding. transformers
  runs each forward on its own compute stream without waiting for the loop's last index copy (5.17 and 5.24, sync
  mode): the forward is made to wait for the stream that made the copies (``_order_forward_after_inputs``).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from docpipe.model.generation import Generation


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


class LoopDied(RuntimeError):
    """The continuous-batching loop stopped or stalled: its pages in flight are lost to it (not to the run)."""


def rows_per_page(pooler_output, counts: list[int]):
    """``get_image_features(...).pooler_output`` split into one (rows, hidden) tensor per page, by each page's count
    of ``<image>`` positions. Its shape changed over transformers releases: one flat tensor (5.17), one tensor per
    crop (5.18-5.20), one per page (5.21 on); flattened first, all three split the same way."""
    import torch

    parts = pooler_output if isinstance(pooler_output, (list, tuple)) else [pooler_output]
    flat = torch.cat([p.reshape(-1, p.shape[-1]) for p in parts])
    if flat.shape[0] != sum(counts):
        raise ValueError(f"{sum(counts)} image positions in the prompts for {flat.shape[0]} feature rows")
    return list(flat.split(counts))


def shell_sliding_window(window: int | None, prompt_tokens: int, max_new_tokens: int) -> int | None:
    """The sliding window the decoding shell keeps: none when every request fits inside it (the window then never
    masks a token, and transformers' paged cache gives full-attention layers its block-table decode path)."""
    if window is None or prompt_tokens + max_new_tokens <= window:
        return None
    return window


def cb_config_kwargs(accepted, page_size: int) -> dict:
    """The cache block size under the name this transformers gives it (5.17: block_size; 5.18 on: page_size), and
    flash-attention left as chosen at load time (5.20 on switches to it by default, unreported)."""
    out = {"page_size" if "page_size" in accepted else "block_size": page_size}
    if "auto_switch_to_flash" in accepted:
        out["auto_switch_to_flash"] = False
    return out


def fault() -> tuple[str, int] | None:
    """Fault injection for tests, as the model's forward pass in the loop would fail on a GPU.
    DOCPIPE_FAULT_CB=start: every forward of the decoding shell fails (the start check catches it);
    die-after:N: the N+1-th forward after the start raises, which ends transformers' loop;
    hang-after:N: the N+1-th forward blocks for good (a stuck kernel). With any of them ``auto`` tries the
    continuous engine on a CPU too, so the fallback is what runs."""
    spec = os.environ.get("DOCPIPE_FAULT_CB", "")
    if not spec:
        return None
    kind, _, n = spec.partition("-after:")
    return kind, int(n or 0)


@dataclass
class _Pending:
    future: Future
    rows: range
    forced: bool  # no stop tokens: the page runs to its max_new_tokens, whatever it emits


class ContinuousEngine:
    name = "continuous"
    streams = True  # pages are queued and collected apart: a call never waits for a whole batch to decode

    def __init__(self, loaded, opts, stop_ids: list[int], pad_id: int, pages_in_flight: int):
        import copy

        import torch
        from transformers import AutoModelForCausalLM

        from docpipe.model.load import chat_prompt

        self.m, self.opts, self.stop_ids = loaded, opts, stop_ids
        model, family = loaded.model, loaded.family
        self.family = family
        inner = getattr(model, "model", None)
        text_model = getattr(inner, family.decoder, None)
        if text_model is None or not hasattr(inner, "get_image_features") or not hasattr(model, "lm_head"):
            raise UnsupportedModel(f"{type(model).__name__} has no separate text model, image encoder and "
                                   "lm_head to serve through a feature bank")
        text_config = copy.deepcopy(model.config.text_config)
        self.image_token_id = family.image_token_id(model)
        self.vocab = text_model.embed_tokens.num_embeddings
        self.rows_per_page = family.max_image_rows(model)  # Idefics2: 5 x 64; Idefics3, LightOnOCR: by page shape
        self.prompt_tokens = family.prompt_tokens(chat_prompt(loaded.processor, 1, opts.prompt))
        self.plan = None
        self.encode_pages = max(1, opts.batch_size)
        # Without a sliding window where no request reaches it (the same tokens; the paged cache then gives every
        # layer the full-attention allocator and its decode fast path).
        self.sliding_window = shell_sliding_window(getattr(text_config, "sliding_window", None),
                                                   self.prompt_tokens, opts.max_new_tokens)
        from docpipe.model import attention as varlen
        from docpipe.model.sizing import head_dim

        self.kernel, self.attention_reason = varlen.choose(
            loaded.device, loaded.dtype, getattr(opts, "engine_attention", "auto"), loaded.attention,
            self.sliding_window, head_dim(text_config))
        if loaded.device == "cuda":
            self.plan = _plan_on_gpu(loaded, opts, self.prompt_tokens, self.rows_per_page, path=self.attention_path)
            pages_in_flight, self.encode_pages = self.plan.pages_in_flight, self.plan.encode_pages
        self.capacity_pages = max(1, pages_in_flight)
        capacity = self.rows_per_page * self.capacity_pages
        self.bank = torch.zeros(capacity, text_config.hidden_size, dtype=loaded.dtype, device=loaded.device)
        self.bank_rows = capacity
        self._free = [range(0, capacity)]  # free row ranges
        self._rows_freed = threading.Condition()
        self.pages_in_flight = 0
        self.peak_pages_in_flight = 0
        self.dead: str | None = None  # why the loop can take no more pages, once it can't
        self._encode_lock = threading.Lock()
        # The pages' own stream (processor, vision tower, bank writes): apart from the loop's (see the module notes)
        self.encode_stream = torch.cuda.Stream(device=loaded.device) if loaded.device == "cuda" else None
        # Set to a list by pipeline/tools/gpu_check.py: (t, forward tokens, requests) per step, admission and
        # completion times per page, (start, end) per encode call. None in runs: nothing is kept.
        self.timeline: dict[str, list] | None = None
        self._undo_attention = None
        self.ordered = False  # the loop's forwards wait for its input copies (_order_forward_after_inputs)

        # A causal-LM shell: its own modules and config (built on the meta device, no memory), holding the Idefics2
        # text model's weight-bearing modules (linears, norms, rotary embedding, lm_head) and the bank embedding.
        # transformers' manager rewrites the shell's config (5.17-5.19: a paged attention implementation), which
        # the text model, still used by generate, never sees; nothing of the text model is swapped or put back.
        text_config.sliding_window = self.sliding_window
        # transformers' own kernel for the shell: the loaded one (flash, sdpa), sdpa when sdpa is asked for; a varlen
        # kernel is installed once the manager has started.
        shell_attention = "sdpa" if self.kernel is not None or getattr(opts, "engine_attention", "auto") == "sdpa" \
            else loaded.attention
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(text_config, attn_implementation=shell_attention)
        _share_leaves(lm.model, text_model)
        lm.lm_head = model.lm_head
        lm.model.embed_tokens = _bank_embedding(text_model.embed_tokens, self.bank)
        unshared = [n for n, t in [*lm.named_parameters(), *lm.named_buffers()] if t.is_meta]
        if unshared:
            raise UnsupportedModel(f"the decoding shell has tensors the text model does not: {unshared[:3]}")
        self.lm = lm
        self._fault = fault()
        self._forwards = 0
        if self._fault:
            lm.register_forward_pre_hook(self._inject)
        try:
            self._start(loaded, opts, stop_ids, pad_id, self.capacity_pages)
        except Exception:
            self.close()
            raise

    @property
    def attention(self) -> str:
        """The attention kernel the loop runs (recorded in the manifest)."""
        if self.kernel is not None:
            return self.kernel.name
        return self.lm.config._attn_implementation

    @property
    def attention_path(self) -> str:
        """varlen (PyTorch's kernels, or their CPU reference), flash (flash-attn's) or sdpa (transformers' packed)."""
        if self.kernel is not None:
            return "varlen"
        if getattr(self.opts, "engine_attention", "auto") == "sdpa":
            return "sdpa"
        return "flash" if self.m.attention.startswith("flash") else "sdpa"

    def encoding(self):
        """The context pages are processed and encoded in: the engine's own CUDA stream (nothing on a CPU)."""
        import contextlib

        import torch

        return torch.cuda.stream(self.encode_stream) if self.encode_stream is not None else contextlib.nullcontext()

    def _start(self, loaded, opts, stop_ids: list[int], pad_id: int, pages_in_flight: int) -> None:
        import inspect

        from transformers import ContinuousBatchingConfig, GenerationConfig

        lm = self.lm
        lm.generation_config = GenerationConfig(do_sample=False, max_new_tokens=opts.max_new_tokens,
                                                eos_token_id=stop_ids, pad_token_id=pad_id)
        lm.eval()
        cuda = loaded.device == "cuda"
        quantized = opts.quantization != "none"
        prompt = self.prompt_tokens
        # The KV cache is sized for the pages the bank admits, not for all free memory (transformers' default,
        # which on a CPU is most of the host's RAM).
        page_size = 256
        blocks_per_page = -(-(prompt + opts.max_new_tokens) // page_size) + 1
        accepted = inspect.signature(ContinuousBatchingConfig).parameters
        cb = ContinuousBatchingConfig(
            allow_block_sharing=False,
            num_blocks=blocks_per_page * max(1, pages_in_flight),
            max_requests_per_batch=max(1, pages_in_flight),
            # Tokens per forward pass: a few prefills at a time on a CPU; the plan's on a GPU (None would let 5.17 fill
            # free memory with the attention mask, [tokens, cache + tokens], eating what the encoding needs).
            max_batch_tokens=self.plan.batch_tokens if self.plan is not None else 2 * prompt,
            # bitsandbytes kernels are not graph-capturable: those weights decode eagerly. Otherwise None:
            # transformers' own heuristic (it knows which attention paths capture well), captured in warm-up.
            use_cuda_graph=False if quantized or not cuda else None,
            default_compile_level=0,
            **cb_config_kwargs(accepted, page_size),
            # transformers' own footprint check against what the plan gives it: all but the encoding's share
            **({"max_memory_percent": self.plan.memory_fraction()}
               if self.plan is not None and "max_memory_percent" in accepted else {}),
        )
        notes = ["bitsandbytes weights: no CUDA graphs"] if cuda and quantized else []
        notes.append(f"attention {self.attention} ({self.attention_reason})")
        if self.plan is not None:
            notes.append(self.plan.describe())
        self.note = "; ".join(notes)
        try:  # sizes the per-request block table (transformers >= 5.2x; older ones size it themselves)
            from transformers.generation.continuous_batching.utils import WorkloadHints

            hints = {"workload_hints": WorkloadHints(max_prompt_length=prompt, max_generated_length=opts.max_new_tokens,
                                                     num_requests=max(1, pages_in_flight))}
        except ImportError:
            hints = {}
        self.manager = lm.init_continuous_batching(generation_config=lm.generation_config,
                                                   continuous_batching_config=cb, **hints)
        _order_forward_after_inputs(self.manager, self)
        if self.kernel is not None:  # after the manager's own choice (5.24 refuses a custom name there)
            from docpipe.model.attention import install

            self._undo_attention = install(lm, self.kernel)
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._counter = 0
        self._last_progress, self._last_step = time.monotonic(), None
        if cuda:
            self.manager.warmup()  # captures the CUDA graphs; it only logs a failure: the check below finds it
        # Started from a daemon thread, so its generation thread is one too (threads inherit it): a non-daemon
        # loop kept model actors alive after their run ended (seen: two orphaned CPU actors of 8 GB each).
        starter = threading.Thread(target=self.manager.start, daemon=True)
        starter.start()
        starter.join()
        self._stop = threading.Event()
        self._dispatcher = threading.Thread(target=self._dispatch, name="docpipe-cb-results", daemon=True)
        self._dispatcher.start()
        self._check_loop()

    def _check_loop(self) -> None:
        """One real request through the running loop (prefill and decode, CUDA graphs included where captured):
        transformers' warm-up swallows its errors, so a loop that can't run is found here, where ``auto`` can
        still fall back, rather than in every page of the run."""
        future = self._queue([self.stop_ids[0]] * 4, range(0, 0), max_new_tokens=2, forced=True)
        try:
            future.result(timeout=self.opts.engine_stall_timeout_s)  # a safety net: the loop answers or dies
        except Exception as exc:
            raise RuntimeError(f"the continuous-batching loop failed its start check: {exc}") from None
        if self._fault:
            self._forwards = 0  # die-after:N counts the run's forward passes, not the check's

    def _inject(self, module, args):
        kind, after = self._fault
        self._forwards += 1
        if kind == "start" or (kind == "die" and self._forwards > after):
            raise RuntimeError(f"injected loop failure (DOCPIPE_FAULT_CB={os.environ.get('DOCPIPE_FAULT_CB')})")
        if kind == "hang" and self._forwards > after:
            threading.Event().wait()  # never set: this forward never returns

    # ---------------------------------------------------------------------------------------- requests
    def submit(self, inputs: dict[str, Any], max_new_tokens: list[int], forced: bool = False
               ) -> list[Future | Exception]:
        """Processor output for a batch of pages in: encode its images and queue its pages, and return at once;
        ``wait`` gives one Generation per page (or the exception that page raised). Raises if the vision encoder
        fails; a page that can't be queued gets its exception in its place. ``forced``: stopping off, every page
        runs to its own max_new_tokens (benchmarks)."""
        ids, mask = inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()
        prompts = [[t for t, keep in zip(row_ids, row_mask) if keep] for row_ids, row_mask in zip(ids, mask)]
        results: list[Future | Exception] = []
        with self.encoding():  # the bank rows too: written on the pages' stream, synchronised before queuing
            features = self.encode(inputs, [sum(t == self.image_token_id for t in p) for p in prompts])
            for prompt, feats, cap in zip(prompts, features, max_new_tokens):  # the processor pads on the left
                try:
                    results.append(self._submit(prompt, feats, cap, forced))
                except Exception as exc:
                    results.append(exc)
        return results

    def encode(self, inputs: dict[str, Any], counts: list[int]) -> list:
        """Each page's image features, ``encode_pages`` pages per vision-tower + connector call: the encoding's
        peak memory is bounded by that, not by the batch size."""
        import torch

        pixels = inputs["pixel_values"]
        out = []
        # One call encodes at a time: an actor's calls in flight (threads) would otherwise add up their peaks.
        with self._encode_lock, torch.inference_mode():
            if self.encode_stream is not None:  # inputs made on another stream (a caller that did not use encoding())
                torch.cuda.current_stream().wait_stream(torch.cuda.default_stream())
            started = time.perf_counter()
            for start in range(0, pixels.shape[0], self.encode_pages):
                part = slice(start, start + self.encode_pages)
                pooled = self.family.image_features(self.m.model, inputs, part)
                out += rows_per_page(pooled, counts[part])
            if self.timeline is not None:
                if self.encode_stream is not None:
                    torch.cuda.current_stream().synchronize()
                self.timeline["encode"].append((started, time.perf_counter(), pixels.shape[0]))
        return out

    @staticmethod
    def wait(handles: list) -> list[Generation | Exception]:
        out = []
        for r in handles:
            if isinstance(r, Future):
                try:
                    r = r.result()  # completes: the dispatcher fails every page of a loop that stops or stalls
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
            if self.bank.is_cuda:  # the loop reads the bank from its own stream: the rows must be there first (this
                # waits for the pages' stream only, not for the loop's work)
                torch.cuda.current_stream().synchronize()
            for pos, row in zip(positions, rows):
                prompt[pos] = self.vocab + row
            return self._queue(prompt, rows, max_new_tokens, forced)
        except Exception:
            self._give_rows(rows)
            if self.dead:  # the loop died (and close() may have dropped the bank) while this page went in
                raise LoopDied(self.dead) from None
            raise

    def _queue(self, prompt: list[int], rows: range, max_new_tokens: int, forced: bool) -> Future:
        future: Future = Future()
        with self._lock:
            if self.dead:
                raise LoopDied(self.dead)
            request_id = f"page-{self._counter}"
            self._counter += 1
            self._pending[request_id] = _Pending(future, rows, forced)
        try:
            queued = self.manager.add_request(prompt, request_id=request_id, max_new_tokens=max_new_tokens,
                                              eos_token_id=-1 if forced else self.stop_ids)
            if queued is None:  # the manager is stopping or failed: it dropped the page (and only logged it)
                raise RuntimeError("the continuous-batching manager refused the page: "
                                   + (self.manager.background_thread_status.can_accept_new_requests() or "stopped"))
        except Exception:
            with self._lock:
                mine = self._pending.pop(request_id, None) is not None
            if not mine:  # _die took the page meanwhile: it gave its rows back and failed its future with LoopDied
                return future
            if self.dead:  # the loop died as the page went in: lost to it, not failed (the caller retries it)
                raise LoopDied(self.dead) from None
            raise
        return future

    def _dispatch(self) -> None:
        """Results to their pages. A loop that stops, or makes no step for engine_stall_timeout_s while pages
        wait, is dead: every page in flight gets LoopDied at once (the caller retries them elsewhere)."""
        try:
            self._dispatch_results()
        except Exception as exc:  # no page may wait on a dispatcher that is gone
            self._die(f"the continuous engine's result thread failed: {exc!r}")

    def _stopping(self) -> bool:
        """The loop ended, or is on its way out (transformers asks it to stop before failing its requests)."""
        return not self.manager.is_running() or bool(self.manager.background_thread_status.can_accept_new_requests())

    def _dispatch_results(self) -> None:
        while not self._stop.is_set():
            result = self.manager.get_result(timeout=0.1)
            if result is None:
                with self._lock:
                    waiting = bool(self._pending)
                step = getattr(self.manager, "current_batch", None)  # the loop's step count: progress without a result
                if not waiting or step != self._last_step:
                    self._last_progress, self._last_step = time.monotonic(), step
                elif not self.manager.is_running():
                    self._die("the continuous-batching loop stopped" + _fatal(self.manager))
                elif time.monotonic() - self._last_progress > self.opts.engine_stall_timeout_s:
                    self._die(f"the continuous-batching loop gave no result in {self.opts.engine_stall_timeout_s:g} s")
                if self.dead:  # a failed manager's get_result returns at once: no busy spin until close()
                    self._stop.wait(0.1)
                continue
            self._last_progress = time.monotonic()
            if not result.is_finished():
                continue
            with self._lock:
                pending = self._pending.pop(result.request_id, None)
            if pending is None:
                continue
            if len(pending.rows):
                self._give_rows(pending.rows)
            if self.timeline is not None:
                self.timeline["completed"].append(time.perf_counter())
            if result.error is not None:
                if self._stopping():  # the loop failed it on its way out
                    self._die(f"the continuous-batching loop stopped: {result.error}")
                pending.future.set_exception(LoopDied(str(result.error)) if self.dead else RuntimeError(result.error))
            else:
                tokens = list(result.generated_tokens)
                pending.future.set_result(Generation(tokens, "length") if pending.forced
                                          else Generation.from_tokens(tokens, self.stop_ids))

    def _die(self, reason: str) -> None:
        with self._lock:
            self.dead = self.dead or reason
            pending, self._pending = list(self._pending.values()), {}
        for p in pending:
            if len(p.rows):
                self._give_rows(p.rows)
            p.future.set_exception(LoopDied(self.dead))
        with self._rows_freed:
            self._rows_freed.notify_all()  # a page waiting for bank rows learns it will get none

    # ---------------------------------------------------------------------------------------- the bank
    def _take_rows(self, n: int) -> range:
        if self.dead:  # before the bank, which close() drops
            raise LoopDied(self.dead)
        if n > self.bank_rows:
            raise ValueError(f"a page with {n} image rows exceeds the feature bank ({self.bank_rows} rows)")
        with self._rows_freed:
            while True:
                if self.dead:
                    raise LoopDied(self.dead)
                for i, free in enumerate(self._free):
                    if len(free) >= n:
                        self._free[i] = range(free.start + n, free.stop)
                        self.pages_in_flight += 1
                        self.peak_pages_in_flight = max(self.peak_pages_in_flight, self.pages_in_flight)
                        if self.timeline is not None:
                            self.timeline["admitted"].append((time.perf_counter(), self.pages_in_flight))
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

    def stop_loop(self) -> None:
        """Stop the manager and the result thread. The shell gets its own attention back (5.17-5.19 gave it a paged
        one): it can then run as a plain causal LM on its bank (pipeline/tools/gpu_check.py compares its logits)."""
        if hasattr(self, "_stop"):
            self._stop.set()
        manager = getattr(self, "manager", None)
        # Whenever its thread was started, even one that died: stop() releases the cache, is_running() would skip it.
        if manager is not None and getattr(manager, "_generation_thread", None) is not None:
            try:
                manager.stop(block=True, timeout=10, hard_stop=True)  # hard_stop: in transformers 5.17 and 5.24
            except Exception:
                pass
        dispatcher = getattr(self, "_dispatcher", None)
        if dispatcher is not None and dispatcher is not threading.current_thread():
            dispatcher.join(timeout=10)  # a safety net: it wakes every 0.1 s and sees _stop
        undo, self._undo_attention = getattr(self, "_undo_attention", None), None
        if undo is not None:
            undo()

    def close(self) -> None:
        """Stop the loop and let go of its memory. The text model was never changed, so there is nothing to put
        back: generate runs on it even while a stuck loop still holds the shell."""
        import gc

        import torch

        self.stop_loop()
        manager = getattr(self, "manager", None)
        status = getattr(manager, "background_thread_status", None)
        if getattr(status, "fatal_error", None) is not None:
            status.fatal_error = None  # its traceback's frames hold the manager, its cache and batch tensors
        self.manager = manager = status = None
        if getattr(self, "lm", None) is not None:
            self.lm.model.embed_tokens.bank = None  # the shell holds the feature bank as a buffer
        self.bank = None
        gc.collect()
        if self.m.device == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()  # the cache and bank back to the device, for generate's batches


def _share_leaves(shell, source) -> None:
    """Every leaf module of ``shell`` (one without children: a linear, a norm, the rotary embedding) replaced by
    ``source``'s at the same path: the weights are shared, the containers (layers, attention, their config) not."""
    for name, module in list(shell.named_modules()):
        if name and not any(True for _ in module.children()):
            shell.set_submodule(name, source.get_submodule(name))


def _order_forward_after_inputs(manager, engine) -> None:
    """Every forward of the loop (steps, warm-up, graph capture and replay) waits for the stream that made its inputs.

    transformers (5.17 and 5.24, without async batching: sdpa, or no CUDA graphs) prepares a step on the loop
    thread's current stream: host lists to the device, each copied into its static tensors, the last copy (read or
    write indices) left queued; then it runs the forward on its own compute stream, which is created non-blocking
    and never waits for that copy. Anything else queued on that stream first (encode work, before it had its own)
    delays the copy past the forward's first reads: a zeroed cache or a prompt's KV written to the trash slot.
    The batch processor is made in the loop thread (or in warm-up); its model runner is wrapped as it is made."""
    create = manager._create_batch_processor

    def create_ordered():
        processor = create()
        runner = processor.model_runner
        if not getattr(runner, "docpipe_ordered", False):
            compute, io = runner.compute_batch, processor.inputs_and_outputs

            def compute_ordered(model, batch_data):
                import torch

                stream = getattr(io, "compute_stream", None)
                if stream is not None:
                    stream.wait_stream(torch.cuda.current_stream(stream.device))
                if engine.timeline is not None:  # host-side shapes only: no sync
                    engine.timeline["steps"].append((time.perf_counter(), batch_data["input_ids"].shape[-1],
                                                     batch_data["cu_seq_lens_q"].shape[0] - 1))
                return compute(model, batch_data)

            runner.compute_batch, runner.docpipe_ordered = compute_ordered, True
        engine.ordered = True
        return processor

    manager._create_batch_processor = create_ordered


def _fatal(manager) -> str:
    error = getattr(manager.background_thread_status, "fatal_error", None) or getattr(
        manager.background_thread_status, "error", None)
    return f": {error}" if error else ""


def _plan_on_gpu(loaded, opts, prompt_tokens: int, rows_per_page: int, splitting: bool | None = None,
                 path: str = "sdpa"):
    """The engine's size on this GPU, from the memory left after loading (pipeline/model/sizing.py): the memory plan
    with flash-attn or torch's varlen kernels; with transformers' packed sdpa, whose step slows down with more
    requests, no more than SDPA_MAX_PAGES unless max_pages_in_flight says otherwise. An actor sharing the GPU
    (gpu_memory_share) sizes itself from its share. The encoding's peak is the model family's (``splitting``, once
    passed here, is read from the processor by the family)."""
    import torch

    from docpipe.model.sizing import (SDPA_MAX_PAGES, batch_tokens, device_memory, kv_bytes_per_page,
                                        kv_bytes_per_token, plan_pages)

    config = loaded.model.config
    dtype_bytes = torch.finfo(loaded.dtype).bits // 8
    free, total = device_memory(opts)
    max_pages = opts.max_pages_in_flight or (SDPA_MAX_PAGES if path == "sdpa" else None)
    kv_per_page = kv_bytes_per_page(config.text_config, prompt_tokens, opts.max_new_tokens, dtype_bytes)
    window = shell_sliding_window(getattr(config.text_config, "sliding_window", None), prompt_tokens,
                                  opts.max_new_tokens)
    return plan_pages(
        free, total,
        kv_per_page=kv_per_page,
        encode_per_page=loaded.family.encode_bytes_per_page(config, dtype_bytes),
        bank_per_page=rows_per_page * config.text_config.hidden_size * dtype_bytes,
        batch_size=opts.batch_size, max_pages=max_pages,
        batch_tokens=batch_tokens(prompt_tokens, max_pages),
        cache_tokens_per_page=kv_per_page // kv_bytes_per_token(config.text_config, dtype_bytes),
        # transformers' masks: none with flash attention, one per attention type (sliding is a second) otherwise.
        # With torch's varlen kernels none is made, but transformers' footprint check counts one (its name is not a
        # flash one): planned as counted, so that check passes.
        masks=0 if path == "flash" else (1 if window is None else 2),
        dtype_bytes=dtype_bytes,
    )
