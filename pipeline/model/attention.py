"""The continuous engine's attention on PyTorch's own FlashAttention kernels, for GPUs without the flash-attn package.

transformers' continuous batching gives a model without flash-attn its packed sdpa path: every decode step gathers each
request's whole context, expands it for grouped-query attention and runs one dense attention over all requests behind
a block-diagonal mask (bytes and FLOPs growing with the square of the pages in flight). PyTorch ships FlashAttention's
variable-length kernel (``torch.nn.attention.varlen.varlen_attn``, CUDA only; ``torch.ops.aten._flash_attention_forward``
beneath it): packed queries with cumulative sequence lengths, no mask, GQA read natively, and (torch 2.12 on) a paged
form that reads the KV cache through a block table, without the gather.

``varlen_attention`` is registered as an attention implementation (``NAME``) and given to the decoding shell after
transformers' manager has started (5.24 refuses a custom name in its own switch; 5.17 rewrites the shell's to a paged
one at start). It takes the indices transformers prepares for every attention (``cu_seq_lens_q/k``, ``read_index``,
``write_index``) and works under both ends of the range pyproject.toml admits:

- 5.17 hands the attention the new keys and values and the cache; the attention writes and reads it itself.
- 5.2x on: the model's attention calls ``cache.update`` first: with no block table it returns the gathered context;
  with one (``add_block_table``, a pre-hook on the shell) it leaves the cache to the kernel and passes its page views.

The bookkeeping is the same whatever runs the attention: ``Kernel.run`` is torch's kernel on a GPU, or ``reference``
(plain sdpa, one sequence at a time, its causal mask aligned bottom-right as FlashAttention's) on a CPU, so tests on a
CPU check the indices, the block table and the cache writes against ``generate``.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
from typing import Any, Callable

NAME = "docpipe_varlen"  # no "flash" in it: transformers would look for a flash-attn package by that name


@dataclass(frozen=True)
class Kernel:
    """What computes the attention: ``run(q, k, v, cu_q, cu_k, max_q, max_k, scale, block_table, seqused_k)`` with q
    (Tq, H, D), k and v (Tk, Hkv, D) packed, or (pages, page_size, Hkv, D) with a block table; returns (Tq, H, D)."""

    name: str  # recorded in the manifest (engines[].attention)
    paged: bool  # reads the cache through a block table (no gather)
    run: Callable
    page_size: int = 256


def varlen_signature() -> set[str]:
    """The parameters of this torch's ``varlen_attn`` (empty when it has none). 2.10: ``is_causal``; 2.11: ``scale``
    and ``window_size``; 2.12 on: also ``enable_gqa``, ``seqused_k`` and ``block_table`` (the paged form)."""
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return set()
    from torch.nn.attention.varlen import varlen_attn

    return set(inspect.signature(varlen_attn).parameters)


def torch_kernel(page_size: int = 256) -> Kernel | None:
    """torch's own FlashAttention kernel for this torch: varlen_attn's paged form where it has one (2.12 on), else the
    gathered form on the op beneath it; None when it has neither."""
    if {"enable_gqa", "block_table", "seqused_k"} <= varlen_signature():
        from torch.nn.attention.varlen import varlen_attn

        def paged(q, k, v, cu_q, cu_k, max_q, max_k, scale, block_table=None, seqused_k=None):
            return varlen_attn(q.contiguous(), k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=(-1, 0), enable_gqa=True,
                               block_table=block_table, seqused_k=seqused_k)

        return Kernel("torch varlen_attn, paged", True, paged, page_size)
    return aten_kernel(page_size)


def aten_kernel(page_size: int = 256) -> Kernel | None:
    """The gathered form on ``torch.ops.aten._flash_attention_forward``, the op beneath ``varlen_attn``: torch 2.10 and
    2.11's varlen_attn take no GQA (key heads must match the query's); the op does, natively. Its is_causal aligns
    each sequence's queries with the end of its keys (bottom-right), as FlashAttention's varlen kernels do."""
    import torch

    if not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return None

    def gathered(q, k, v, cu_q, cu_k, max_q, max_k, scale, block_table=None, seqused_k=None):
        return torch.ops.aten._flash_attention_forward(q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k,
                                                       max_q, max_k, 0.0, True, False, scale=scale)[0]

    return Kernel("torch _flash_attention_forward, gathered", False, gathered, page_size)


def reference(q, k, v, cu_q, cu_k, max_q, max_k, scale, block_table=None, seqused_k=None):
    """The same attention as the kernels, by plain sdpa one sequence at a time (a CPU, or a check on a GPU): query j of
    a sequence with n keys sits at position n - len(q) + j and sees the keys up to it. Syncs with the host."""
    import torch

    out = torch.empty_like(q)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    used = seqused_k.tolist() if seqused_k is not None else None
    for i in range(len(cq) - 1):
        qi = q[cq[i] : cq[i + 1]]
        n = used[i] if used is not None else ck[i + 1] - ck[i]
        if block_table is None:
            ki, vi = k[ck[i] : ck[i] + n], v[ck[i] : ck[i] + n]
        else:  # pages in the block table's order, cut at the sequence's length
            pages = block_table[i, : -(-n // k.shape[1])].long()
            ki, vi = (x[pages].reshape(-1, *x.shape[2:])[:n] for x in (k, v))
        rows = torch.arange(n - qi.shape[0], n).unsqueeze(1)
        mask = torch.arange(n).unsqueeze(0) <= rows
        o = torch.nn.functional.scaled_dot_product_attention(
            qi.transpose(0, 1).unsqueeze(0), ki.transpose(0, 1).unsqueeze(0), vi.transpose(0, 1).unsqueeze(0),
            attn_mask=mask.to(q.device), scale=scale, enable_gqa=True)
        out[cq[i] : cq[i + 1]] = o[0].transpose(0, 1)
    return out


def reference_kernel(paged: bool, page_size: int = 256) -> Kernel:
    return Kernel("reference (sdpa per sequence, CPU), " + ("paged" if paged else "gathered"), paged, reference,
                  page_size)


def choose(device: str, dtype, requested: str, loaded_attention: str, sliding_window: int | None,
           head_dim: int) -> tuple[Kernel | None, str]:
    """The continuous engine's attention: (kernel, why) for this varlen path, or (None, why) for transformers' own
    (flash when the model loaded with it, packed sdpa otherwise). ``requested``: ModelOptions.engine_attention.
    ``varlen`` on a CPU runs the reference (tests); on a GPU it is torch's kernel or an error."""
    import torch

    if requested == "sdpa":
        return None, "requested"
    if loaded_attention.startswith("flash") and requested != "varlen":  # flash-attn's own paged kernels serve it
        return None, f"{loaded_attention} is loaded"
    problems = []
    if sliding_window is not None:
        problems.append(f"a sliding window ({sliding_window}) the pages reach")
    if head_dim % 8 or head_dim > 256:
        problems.append(f"head dim {head_dim}")
    if device == "cuda":
        if dtype not in (torch.float16, torch.bfloat16):
            problems.append(f"{str(dtype).removeprefix('torch.')} (FlashAttention takes float16 and bfloat16)")
        kernel = torch_kernel()
        if kernel is None:
            problems.append(f"torch {torch.__version__} has no FlashAttention kernel")
    elif requested == "varlen":  # the paged form's bookkeeping, what the pinned torch runs on a GPU
        kernel = reference_kernel(paged=True)
    else:
        return None, f"auto on {device}"
    if problems:
        if requested == "varlen":
            raise ValueError("engine_attention varlen cannot run here: " + "; ".join(problems))
        return None, "no varlen: " + "; ".join(problems)
    why = "requested" if requested == "varlen" else f"auto on {device} without flash-attn"
    return kernel, why if kernel.paged else why + " (this torch's varlen_attn has no paged form: gathered)"


def add_block_table(page_size: int):
    """A forward pre-hook for the shell's text model: a block table for the step, built on the device from the read
    indices transformers prepared (request i reads its pages in order: page j is read_index[cu_k[i] + j * page_size]
    // page_size), so the attention reads the cache through it instead of a gathered copy. Only for one group of
    full-attention layers and a step that reads the cache (a prefill-only step has nothing to read)."""

    def hook(module, args, kwargs):
        reads, cu_k, max_k = kwargs.get("read_index"), kwargs.get("cu_seq_lens_k"), _max_k(kwargs)
        if kwargs.get("block_table") is not None or not reads or len(reads) != 1 or reads[0].numel() == 0:
            return None
        if isinstance(cu_k, dict):
            if set(cu_k) != {"full_attention"}:
                return None
            cu_k = cu_k["full_attention"]
        kwargs["block_table"] = block_table(reads[0], cu_k, max_k, page_size).unsqueeze(0)  # one group
        return args, kwargs

    return hook


def _max_k(kwargs: dict) -> int:
    max_k = kwargs.get("max_seqlen_k", kwargs.get("max_length_k"))  # 5.17: max_seqlen_k; 5.2x on: max_length_k
    return max(max_k.values()) if isinstance(max_k, dict) else max_k


def block_table(read_index, cu_k, max_k: int, page_size: int):
    """(requests, pages) int32: request i's j-th page of the cache, from its read indices (0 past its last page)."""
    import torch

    cu_k = cu_k.long()
    starts = cu_k[:-1].unsqueeze(1) + torch.arange(-(-max_k // page_size), device=cu_k.device) * page_size
    inside = starts < cu_k[1:].unsqueeze(1)
    first = read_index[starts.clamp(max=read_index.numel() - 1)]
    return torch.where(inside, first // page_size, 0).to(torch.int32)


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[Any, None]:
    """The attention implementation ``NAME``: query (1, H, Tq, D); key and value (1, Hkv, T, D), new (5.17, or a
    block table) or gathered (5.2x); returns (Tq, H, D). Without the continuous batch's indices (the shell run as a
    plain causal LM once its loop stopped) it is transformers' sdpa."""
    import torch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if "cu_seq_lens_q" not in kwargs or getattr(module, "docpipe_kernel", None) is None:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, dropout=dropout,
                                               scaling=scaling, **kwargs)
    kernel: Kernel = module.docpipe_kernel
    cache = kwargs.get("cache")  # in the kwargs under 5.17 only (5.2x's attention takes it as its own argument)
    q = query[0].transpose(0, 1)
    k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)
    cu_q, cu_k, max_q, max_k = kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"], _max_q(kwargs), _max_k(kwargs)
    if isinstance(cu_k, dict):
        cu_k = cu_k["full_attention"]
    table, used = kwargs.get("block_table"), None
    if table is not None:
        if cache is not None:  # 5.17: this layer's cache, as pages
            group, in_group = cache.layer_index_to_group_indices[module.layer_idx]
            k_cache, v_cache, table = cache.key_cache[in_group], cache.value_cache[in_group], table[group]
        else:  # 5.2x: cache.update left the cache to the kernel and passed its page views
            k_cache, v_cache = kwargs["k_cache"], kwargs["v_cache"]
        write = kwargs["write_index"][0]
        heads, dim = k.shape[1], k.shape[2]
        for pool, new in ((k_cache, k), (v_cache, v)):
            pool.view(-1, heads, dim).index_copy_(0, write, new.to(pool.dtype))
        k, v = (x.view(-1, kernel.page_size, heads, dim) for x in (k_cache, v_cache))
        used = (cu_k[1:] - cu_k[:-1]).to(torch.int32)
    elif cache is not None:  # 5.17, gathered: the cache's own write and read (the whole context, in order)
        k, v = cache.update(key, value, module.layer_idx, read_index=kwargs["read_index"],
                            write_index=kwargs["write_index"])
    out = kernel.run(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k,
                     scaling if scaling is not None else module.scaling, table, used)
    return out, None


def _max_q(kwargs: dict) -> int:
    return kwargs.get("max_seqlen_q", kwargs.get("max_length_q"))


def register() -> None:
    """``NAME`` among transformers' attention implementations (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention)


def install(shell, kernel: Kernel) -> Callable[[], None]:
    """The shell (a causal LM whose containers are its own) set to ``NAME`` with ``kernel``, after transformers' manager
    made its own choices (no mask preallocated: 5.17 and 5.24 allocate one for sdpa only). Returns the undo: the
    shell's previous attention back (its loop stopped)."""
    register()
    before = shell.config._attn_implementation
    for layer in shell.model.layers:
        layer.self_attn.docpipe_kernel = kernel
    handle = shell.model.register_forward_pre_hook(add_block_table(kernel.page_size), with_kwargs=True) \
        if kernel.paged else None
    shell.set_attn_implementation(NAME)

    def undo():
        if handle is not None:
            handle.remove()
        if shell.config._attn_implementation == NAME:
            shell.set_attn_implementation(before.removeprefix("paged|"))

    return undo
