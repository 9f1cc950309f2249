"""One dispatch over attention kernels, selected by `attention.backend`.

Every backend computes the same two things:
- `causal(q, k, v)`: causal attention of queries q [B, H, Lq, Dh] over keys/values
  [B, K, Lk, Dh] (K divides H: grouped-query attention), where the Lq queries are the
  *last* Lq positions of the Lk keys (bottom-right aligned: query i sees keys
  j <= i + Lk - Lq). Global layers, with or without a KV cache, use this.
- `chunked(q, k, v, q_start=, k_start=, chunk_size=)`: Llama 4 chunked causal
  attention at absolute positions (semantics in `attention/chunked.py`). By default
  it is the generic O(L·C) reshape over `causal`; flex implements it natively.

Backends:
- "sdpa": torch scaled_dot_product_attention; the reference, CPU and GPU. Causal by is_causal
  (Lq == Lk) or a lower-right causal bias (Lq < Lk), never a boolean mask it would have to build.
- "flex": torch.nn.attention.flex_attention, compiled, with a position-aware mask_mod
  and a block mask built analytically (no dense L×L mask is ever evaluated), so fully
  masked blocks are skipped. CPU (slow first compile) and GPU.
- "flash": flash-attn's flash_attn_func, FA4, FA3 or FA2, whichever is the newest installed that
  the GPU supports (attention/flash.py); CUDA only; fp16/bf16 kernels, so fp32 inputs are computed
  in bf16 and cast back.

Shapes: B batch, H query heads, K kv heads, Lq queries, Lk keys, Dh head dim, C chunk.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention
from torch.nn.attention.bias import causal_lower_right

from llamoe.attention.chunked import check_key_range, chunked_attention, visible
from llamoe.attention.flash import FlashFn, FlashVersion, flash_causal
from llamoe.attention.flash import installed as installed_flash
from llamoe.attention.flash import select as select_flash
from llamoe.config_error import ConfigError

# Largest causal mask (elements) sdpa materialises at once where no kernel takes a lower-right causal bias
# natively (CPU; fp32 or GQA on CUDA). CPU SDPA copies the boolean mask into a float bias, so a slice costs
# ~5 bytes per element: ~80 MiB.
SDPA_MASK_BUDGET = 1 << 24


def _native_lower_right(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> bool:
    """Will SDPA run a lower-right causal bias in a fused kernel (CUDA flash or memory-efficient), without
    materialising it? The same test `torch.nn.attention.bias.CausalBias` makes before falling back to a mask."""
    if q.device.type != "cuda":
        return False
    params = SDPAParams(q, k, v, None, 0.0, False, gqa)
    return can_use_flash_attention(params) or can_use_efficient_attention(params)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_mask_elements: int = SDPA_MASK_BUDGET
) -> torch.Tensor:
    """Bottom-right aligned causal attention with torch SDPA.

    Square calls (Lq == Lk) use is_causal and single-query calls need no mask. Otherwise (prefilling a
    block behind a cache) the queries attend under `causal_lower_right(Lq, Lk)`, which the fused CUDA
    kernels apply without any mask. Where SDPA would materialise that bias as an [Lq, Lk] mask instead,
    the queries are split into row slices of at most `max_mask_elements` mask elements, so memory stays
    bounded at any cache length; each slice is lower-right causal again over the keys it can see.
    """
    lq, lk = q.size(-2), k.size(-2)
    gqa = q.size(1) != k.size(1)
    if lq == lk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if lq == 1:  # a single newest query sees every key
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    offset = lk - lq  # query i sees keys j <= i + offset
    rows = lq if _native_lower_right(q, k, v, gqa) else max(1, max_mask_elements // lk)
    outs = []
    for r0 in range(0, lq, rows):
        r1 = min(lq, r0 + rows)
        keys = offset + r1  # rows [r0, r1) see keys [0, keys), the last row all of them: lower-right causal
        bias = causal_lower_right(r1 - r0, keys)
        outs.append(
            F.scaled_dot_product_attention(
                q[:, :, r0:r1], k[:, :, :keys], v[:, :, :keys], attn_mask=bias, enable_gqa=gqa
            )
        )
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class AttentionBackend:
    """Base backend: subclasses supply `causal`; `chunked` defaults to the generic reshape over it."""

    name = ""

    def check(self, device: torch.device) -> None:
        """Raise (naming `attention.backend` and the fix) if this backend cannot run on `device`."""

    def causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def chunked(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_start: int, k_start: int, chunk_size: int
    ) -> torch.Tensor:
        return chunked_attention(q, k, v, q_start=q_start, k_start=k_start, chunk_size=chunk_size, attend=self.causal)


class SdpaBackend(AttentionBackend):
    """The reference: torch scaled_dot_product_attention (fused kernels on CPU and GPU)."""

    name = "sdpa"

    def causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sdpa_attention(q, k, v)


class FlashBackend(AttentionBackend):
    """flash-attn (Dao, 2023): the newest installed version that this GPU supports, FA4, FA3 or FA2
    (`attention/flash.py`). causal=True is bottom-right aligned and GQA is native; fp16/bf16 only, so
    other dtypes run in bf16 and are cast back. Chunked layers use the generic reshape (flash has
    sliding windows, not absolute chunks).
    """

    name = "flash"

    def __init__(self) -> None:
        self._chosen: dict[tuple[int, int], tuple[FlashVersion, FlashFn]] = {}  # by compute capability

    def _pick(self, device: torch.device) -> tuple[FlashVersion, FlashFn]:
        capability = torch.cuda.get_device_capability(device)
        if capability not in self._chosen:
            self._chosen[capability] = select_flash(capability)
        return self._chosen[capability]

    def version(self, device: torch.device) -> FlashVersion:
        """The flash-attn version that runs on CUDA `device`; ConfigError naming `attention.backend` if none."""
        return self._pick(device)[0]

    def check(self, device: torch.device) -> None:
        if device.type != "cuda":
            have = ", ".join(v.name for v, _ in installed_flash()) or "none"
            raise ConfigError(
                "attention.backend",
                f"'flash' runs on CUDA only and the model is on {device.type} (flash-attn versions installed: "
                f"{have}); set attention.backend=sdpa (reference) or flex",
            )
        self.version(device)

    def causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return flash_causal(self._pick(q.device)[1], q, k, v)


# flex_attention's sparse block size (queries x keys).
FLEX_BLOCK = 128

# flex mask_mod: (batch, head, query index, key index) -> may the query see the key?
MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _positions_mask_mod(q_start: int, k_start: int, chunk_size: Optional[int], device: torch.device) -> MaskMod:
    """mask_mod for flex: `visible` at absolute positions (offsets are tensors, so new offsets reuse the kernel)."""
    q_off = torch.tensor(q_start, dtype=torch.int32, device=device)
    k_off = torch.tensor(k_start, dtype=torch.int32, device=device)

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return visible(q_idx + q_off, kv_idx + k_off, chunk_size)

    return mask_mod


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query-block row of a [QB, KB] bool matrix: the count of set blocks and their indices first (int32)."""
    count = blocks.sum(-1, dtype=torch.int32)
    index = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return count[None, None], index[None, None]  # [1, 1, QB], [1, 1, QB, KB]: broadcast over B and H


@functools.lru_cache(maxsize=64)
def flex_block_mask(
    lq: int, lk: int, q_start: int, k_start: int, chunk_size: Optional[int], device: torch.device
) -> Any:
    """BlockMask of `visible` for queries at q_start.. and keys at k_start.., built from block bounds.

    A block of queries [qa, qz] x keys [ka, kz] (absolute positions) is
    - partly visible iff ka <= qz and, when chunked, the chunk ranges of the two intervals overlap
      (then the pair (max(ka, nC), min(qz, nC+C-1)) of a shared chunk n is visible), and
    - fully visible iff kz <= qa and, when chunked, ka and qz share a chunk, and both blocks are
      complete (flex, like `create_block_mask`, treats the padding past Lq or Lk as masked).
    This costs O(Lq/128 · Lk/128) instead of evaluating the mask on every (query, key) pair.
    """
    from torch.nn.attention.flex_attention import BlockMask

    def bounds(start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = torch.arange(0, length, FLEX_BLOCK, device=device)
        last = torch.clamp(first + FLEX_BLOCK, max=length) - 1
        return start + first, start + last

    qa, qz = (t[:, None] for t in bounds(q_start, lq))  # [QB, 1]
    ka, kz = (t[None, :] for t in bounds(k_start, lk))  # [1, KB]
    seen = ka <= qz
    full = (kz <= qa) & (qz - qa + 1 == FLEX_BLOCK) & (kz - ka + 1 == FLEX_BLOCK)
    if chunk_size is not None:
        c = chunk_size
        seen &= torch.maximum(qa // c, ka // c) <= torch.minimum(qz // c, kz // c)
        full &= ka // c == qz // c
    kv_num, kv_index = _ordered(seen & ~full)
    full_num, full_index = _ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_index,
        full_num,
        full_index,
        BLOCK_SIZE=FLEX_BLOCK,
        mask_mod=_positions_mask_mod(q_start, k_start, chunk_size, device),
        seq_lengths=(lq, lk),
    )


@functools.cache
def _compiled_flex_attention() -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


class FlexBackend(AttentionBackend):
    """torch flex_attention with a block-sparse, position-aware mask (chunked natively).

    `compile=False` runs flex's unfused eager reference (materialises scores; for tests of the
    masks only). Single-query decode steps need no mask and go to SDPA, which avoids a
    recompile for every new cache length.
    """

    name = "flex"

    def __init__(self, compile: bool = True) -> None:
        self.compile = compile

    def check(self, device: torch.device) -> None:
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            raise RuntimeError(
                f"attention.backend='flex' needs torch >= 2.5 (found {torch.__version__}); "
                "upgrade torch or set attention.backend=sdpa"
            )

    def _flex(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, k_start: int, chunk: Optional[int]
    ) -> torch.Tensor:
        if self.compile:
            attend = _compiled_flex_attention()
        else:
            from torch.nn.attention.flex_attention import flex_attention as attend
        block_mask = flex_block_mask(q.size(2), k.size(2), q_start, k_start, chunk, q.device)
        return attend(q, k, v, block_mask=block_mask, enable_gqa=q.size(1) != k.size(1))

    def causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        lq, lk = q.size(2), k.size(2)
        if lq == 1:
            return sdpa_attention(q, k, v)
        return self._flex(q, k, v, q_start=lk - lq, k_start=0, chunk=None)

    def chunked(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_start: int, k_start: int, chunk_size: int
    ) -> torch.Tensor:
        if q.size(2) == 1:  # decode: the generic path slices the chunk and calls `causal` (SDPA)
            return super().chunked(q, k, v, q_start=q_start, k_start=k_start, chunk_size=chunk_size)
        check_key_range(q_start, q.size(2), k_start, k.size(2))
        return self._flex(q, k, v, q_start=q_start, k_start=k_start, chunk=chunk_size)


_BACKENDS: dict[str, AttentionBackend] = {b.name: b for b in (SdpaBackend(), FlexBackend(), FlashBackend())}


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


@functools.lru_cache(maxsize=None)
def _checked_backend(name: str, device_type: str) -> AttentionBackend:
    if name not in _BACKENDS:
        raise ValueError(f"attention.backend={name!r} is not a backend; use one of {backend_names()}")
    backend = _BACKENDS[name]
    backend.check(torch.device(device_type))
    return backend


def get_backend(name: str, device: torch.device | str = "cpu") -> AttentionBackend:
    """The backend for `attention.backend`; fails fast, naming the fix, when it cannot run on `device`."""
    return _checked_backend(name, torch.device(device).type)
