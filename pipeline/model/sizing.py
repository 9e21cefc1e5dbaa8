"""How many pages the continuous engine holds on a GPU, and how many it encodes at once: pure arithmetic on the
model's configuration and the memory left after loading, so it is tested on a CPU with given numbers.

Per page, two costs matter:
- its KV cache, held from prefill to its last token: 2 (K and V) x layers x kv_heads x head_dim x dtype bytes per
  token, over its prompt and its max_new_tokens, rounded up to whole cache blocks (idefics2-8b: 128 KiB a token);
- the peak of encoding its images, held only while it is encoded: Idefics2's connector runs a gated MLP
  (1152 -> 14336 -> 4096) over every patch of every crop, about 0.4 GB per 980 px crop in bf16, more than the
  vision tower's own activations with a memory-efficient attention kernel.
The encoding is done a few pages at a time (``encode_pages``), so its peak is bounded whatever the batch size;
what memory is left after that and a reserve holds the KV cache of ``pages_in_flight`` pages.

Without flash attention, transformers also preallocates an attention mask of batch tokens x (cache tokens + batch
tokens) in the model's dtype: a per-page cost (its cache tokens) and a fixed one, counted here too.
"""

from __future__ import annotations

from dataclasses import dataclass

# Most pages the engine holds at once when sized from memory. A decode step of idefics2-8b reads 14 GB of weights
# and 128 KiB of KV per token of context: at 256 pages of ~1 k tokens the KV reads (~32 GB) already outweigh the
# weights twice over, so more pages add step time about as fast as they add tokens.
DEFAULT_MAX_PAGES = 256
# Kept free: the CUDA context's fragmentation, the decode step's activations and logits, CUDA graph pools.
RESERVE_FRACTION = 0.10
RESERVE_BYTES = 2 * 2**30
# Share of the usable memory the image encoding may take at its peak.
ENCODE_SHARE = 0.25
# transformers' own default tokens per forward pass: the most the loop takes, whatever the pages.
MAX_BATCH_TOKENS = 8192
# Prefills a step may hold beside the decodes of every page in flight.
PREFILLS_PER_STEP = 4
# Working ceilings of an H100 (issue 20's, below the datasheet's 3.35 TB/s and 989 TFLOP/s): the roofline estimates'
# defaults; bench --gpu-check measures the device's own (its ceilings section).
H100_COPY_BYTES_PER_S = 3.0e12
H100_MATMUL_FLOPS = 790e12
# Queries per block of the memory-efficient sdpa kernel a masked packed batch runs on: it reads every key once per
# block of queries.
SDPA_QUERY_BLOCK = 64
# transformers' packed sdpa path: pages in flight where its decode step gives the most tokens per second for
# idefics2-8b at 656 tokens of context (best_pages below, on an H100's working ceilings: 64; computed, not
# measured). Its step gathers, expands and attends over the whole batch's cache: beyond this, more pages slow it.
SDPA_MAX_PAGES = 64


@dataclass(frozen=True)
class EnginePlan:
    pages_in_flight: int  # the feature bank's pages, the KV cache's requests, the decode batch's cap
    encode_pages: int  # pages per vision-tower + connector call
    kv_bytes_per_page: int
    encode_bytes_per_page: int
    free_bytes: int  # memory left after loading, as measured
    batch_tokens: int = 0  # tokens per forward pass of the loop (transformers' max_batch_tokens)
    mask_bytes: int = 0  # the attention mask transformers preallocates for them (0: flash attention, or none given)

    def describe(self) -> str:
        return (f"{self.pages_in_flight} pages in flight, encoding {self.encode_pages} at a time (sized from "
                f"{self.free_bytes / 2**30:.1f} GiB free: {self.kv_bytes_per_page / 2**20:.0f} MiB KV and "
                f"{self.encode_bytes_per_page / 2**20:.0f} MiB encoding peak per page"
                + (f"; {self.batch_tokens} tokens a step, {self.mask_bytes / 2**20:.0f} MiB attention mask)"
                   if self.batch_tokens else ")"))

    def memory_fraction(self) -> float:
        """transformers' max_memory_percent: all of the memory free when its cache is made but the encoding's share,
        so its own footprint check (KV cache, mask, its activation peaks) fails rather than eat into the encoding."""
        return max(0.05, 1 - self.encode_pages * self.encode_bytes_per_page / max(1, self.free_bytes))


def share_of_free(free: int, total: int, held: int, share: float = 1.0) -> int:
    """The memory an actor may plan with: what is free, and no more than its share of the device less what it holds
    already (its weights): two actors sharing a GPU would otherwise each plan with the same free memory."""
    return max(0, min(free, int(share * total) - held))


def device_memory(opts) -> tuple[int, int]:
    """(memory this actor may plan with, the device's total) on the current CUDA device: share_of_free at the
    options' gpu_memory_share."""
    import torch

    free, total = torch.cuda.mem_get_info()
    return share_of_free(free, total, torch.cuda.memory_reserved(), getattr(opts, "gpu_memory_share", 1.0)), total


def head_dim(text_config) -> int:
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


def kv_heads(text_config) -> int:
    return getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads


@dataclass(frozen=True)
class DecodeShape:
    """What a decode step's cost depends on, from a text config (pipeline/model/sizing.py's roofline)."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    weight_bytes: int  # read once a step: the text layers and lm_head

    @classmethod
    def of(cls, text_config, dtype_bytes: int, weight_bytes: int) -> "DecodeShape":
        return cls(text_config.num_hidden_layers, text_config.num_attention_heads, kv_heads(text_config),
                   head_dim(text_config), dtype_bytes, weight_bytes)


PATHS = ("sdpa", "varlen_gathered", "varlen_paged", "flash")


def decode_step_cost(path: str, requests: int, context: int, shape: DecodeShape) -> tuple[int, int]:
    """(bytes moved, FLOPs) of one decode step of ``requests`` pages with ``context`` tokens each, per attention path:

    - flash (flash-attn's paged kernel) and varlen_paged (torch's, through a block table): the weights and the KV
      cache read once;
    - varlen_gathered (torch's kernel on transformers' gathered copy): the cache read, written as a packed copy
      and read again by the kernel (3x);
    - sdpa (transformers' packed path): the gathered copy (2x), expanded for grouped-query attention (heads /
      kv_heads times, written once and read once per block of SDPA_QUERY_BLOCK queries), and the block-diagonal
      mask [requests, requests x context]; every query attends to the whole batch's cache (FLOPs grow with
      requests squared).
    Computed, not measured: bench --gpu-check sets its measured step beside this at the measured copy rate."""
    kv = shape.layers * 2 * shape.kv_heads * shape.head_dim * shape.dtype_bytes * requests * context
    matmuls = 2 * (shape.weight_bytes // shape.dtype_bytes) * requests
    attention = 4 * requests * context * shape.heads * shape.head_dim * shape.layers
    if path in ("flash", "varlen_paged"):
        return shape.weight_bytes + kv, matmuls + attention
    if path == "varlen_gathered":
        return shape.weight_bytes + 3 * kv, matmuls + attention
    if path != "sdpa":
        raise ValueError(f"unknown attention path {path!r}: {PATHS}")
    groups = shape.heads // shape.kv_heads
    blocks = -(-requests // SDPA_QUERY_BLOCK)
    mask = shape.layers * requests * requests * context * shape.dtype_bytes
    return (shape.weight_bytes + 2 * kv + groups * kv * (1 + blocks) + mask,
            matmuls + attention * requests)


def step_roofline_s(path: str, requests: int, context: int, shape: DecodeShape,
                    copy_bytes_per_s: float = H100_COPY_BYTES_PER_S, matmul_flops: float = H100_MATMUL_FLOPS) -> float:
    """The least time a decode step can take: its bytes at the copy rate or its FLOPs at the matmul rate."""
    moved, flops = decode_step_cost(path, requests, context, shape)
    return max(moved / copy_bytes_per_s, flops / matmul_flops)


def best_pages(path: str, context: int, shape: DecodeShape, candidates=range(16, 257, 16), **ceilings) -> int:
    """Pages in flight giving the most decode tokens per second on the roofline (the last of equals)."""
    return max(candidates, key=lambda b: (b / step_roofline_s(path, b, context, shape, **ceilings), b))


def batch_tokens(prompt_tokens: int, max_pages: int | None = None) -> int:
    """Tokens per forward pass: a decode token for every page the engine may hold and PREFILLS_PER_STEP pages'
    prefills, up to MAX_BATCH_TOKENS. More would add mask memory (growing with the cache) and no throughput: a
    forward of ~2 k tokens already keeps an 8B model's matmuls compute-bound (idefics2-8b: 256 + 4 x 356 = 1680)."""
    return min(MAX_BATCH_TOKENS, (max_pages or DEFAULT_MAX_PAGES) + PREFILLS_PER_STEP * prompt_tokens)


def mask_bytes(batch_tokens: int, cache_tokens: int, dtype_bytes: int, masks: int = 1) -> int:
    """transformers' preallocated attention mask, [batch tokens, cache tokens + batch tokens] in the model's dtype:
    one per attention type (two with a sliding window), none with flash attention."""
    return masks * batch_tokens * (cache_tokens + batch_tokens) * dtype_bytes


def kv_bytes_per_token(text_config, dtype_bytes: int) -> int:
    return 2 * text_config.num_hidden_layers * kv_heads(text_config) * head_dim(text_config) * dtype_bytes


def kv_bytes_per_page(text_config, prompt_tokens: int, max_new_tokens: int, dtype_bytes: int,
                      block_tokens: int = 256) -> int:
    """One page's KV cache at its longest, in whole blocks (one more: the engine's allowance for block edges)."""
    blocks = -(-(prompt_tokens + max_new_tokens) // block_tokens) + 1
    return blocks * block_tokens * kv_bytes_per_token(text_config, dtype_bytes)


def encode_bytes_per_page(config, crops_per_page: int, dtype_bytes: int) -> int:
    """Peak activation memory of encoding one page: per crop, the connector's gated MLP (gate, up and their
    product at the connector's width) plus the vision tower's MLP and a few hidden-state copies, over every patch.
    Attention scores are not counted: a memory-efficient kernel (sdpa's, flash) never materialises them."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    connector = config.text_config.intermediate_size  # Idefics2's modality projection is as wide as the text MLP
    per_patch = 3 * connector + vision.intermediate_size + 4 * vision.hidden_size
    return crops_per_page * patches * per_patch * dtype_bytes


def plan_pages(free_bytes: int, total_bytes: int, kv_per_page: int, encode_per_page: int, bank_per_page: int,
               batch_size: int, max_pages: int | None = None, batch_tokens: int = 0, cache_tokens_per_page: int = 0,
               masks: int = 0, dtype_bytes: int = 2) -> EnginePlan:
    """Pages in flight and pages per encoder call for ``free_bytes`` of device memory left after loading.

    A reserve stays free; the encoding gets up to ENCODE_SHARE of the rest in whole pages (at least one, at most
    ``batch_size``); the KV cache, feature bank and attention-mask share (``masks`` of them for ``batch_tokens``,
    see mask_bytes) of ``pages_in_flight`` pages fill what remains, up to ``max_pages`` (DEFAULT_MAX_PAGES)."""
    cap = max_pages or DEFAULT_MAX_PAGES
    usable = _usable(free_bytes, total_bytes)
    encoding = encode_pages(free_bytes, total_bytes, encode_per_page, batch_size)
    fixed = mask_bytes(batch_tokens, 0, dtype_bytes, masks)  # the mask's batch x batch part
    per_page = kv_per_page + bank_per_page + mask_bytes(batch_tokens, cache_tokens_per_page, dtype_bytes, masks) - fixed
    left = max(0, usable - encoding * encode_per_page - fixed)
    pages = max(1, min(cap, left // max(1, per_page)))
    return EnginePlan(pages, encoding, kv_per_page, encode_per_page, free_bytes, batch_tokens,
                      mask_bytes(batch_tokens, pages * cache_tokens_per_page, dtype_bytes, masks))


def _usable(free_bytes: int, total_bytes: int) -> int:
    return max(0, free_bytes - int(RESERVE_FRACTION * total_bytes) - RESERVE_BYTES)


def encode_pages(free_bytes: int, total_bytes: int, encode_per_page: int, batch_size: int) -> int:
    """Pages per vision call when nothing else is planned (generate): ENCODE_SHARE of the usable memory, at least
    one, at most ``batch_size``."""
    return max(1, min(batch_size, int(ENCODE_SHARE * _usable(free_bytes, total_bytes)) // max(1, encode_per_page)))
