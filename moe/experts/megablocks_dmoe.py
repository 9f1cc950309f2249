"""Expert backend on MegaBlocks' dropless-MoE block-sparse kernels (Gale et al., 2022).

Shapes: N expert-sorted token-slots, P = N padded per expert to multiples of the block
size Bk (128), D model dim, F expert hidden dim, E experts.

MegaBlocks expresses all experts' first layer as one block-sparse product: the [P, E·F]
hidden matrix has, for each block of 128 token rows, only the F/128 column blocks of
that rows' expert. Each expert's group is padded to a multiple of 128 rows, the
"topology" (which column blocks each row block holds) is built by `megablocks.ops.topology`,
and `stk.ops.sdd` (dense × dense → sparse) / `stk.ops.dsd` (sparse × dense → dense)
compute the SwiGLU. CUDA only; `megablocks` and `stk` are imported when the backend is
built, so CPU machines never import them. Requirements are in `moe/experts/__init__.py`.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn.functional as F

from llamoe.config_error import ConfigError
from llamoe.moe.experts.base import Experts

BLOCK = 128  # MegaBlocks' block size; token groups and F are tiled by it


def _import_kernels() -> tuple[Any, Any]:
    return importlib.import_module("megablocks.ops"), importlib.import_module("stk")


class MegaBlocksExperts(Experts):
    """Block-sparse dMoE: pad groups to 128 rows, SwiGLU through stk sdd/dsd, unpad."""

    hidden_major = True  # w1, w3 are handed to sdd as [D, E·F] views (`_dense_weights`)

    @classmethod
    def check_available(cls, hidden_dim: int) -> None:
        fix = "install megablocks on a CUDA machine (see moe/experts/__init__.py) or set moe.backend=torch"
        if not torch.cuda.is_available():
            raise ConfigError("moe.backend", f"'megablocks' runs on CUDA only and no GPU is visible; {fix}")
        try:
            _import_kernels()
        except ImportError as err:
            raise ConfigError("moe.backend", f"'megablocks' could not be imported ({err}); {fix}") from err
        if hidden_dim % BLOCK != 0:
            raise ConfigError(
                "moe.expert_hidden_dim",
                f"the megablocks backend tiles F by {BLOCK}; {hidden_dim} is not a multiple of it",
            )

    def _topology(self, padded_bins: torch.Tensor, padded_rows: int) -> Any:
        """stk.Matrix [P, E·F] whose row block i holds the F/128 column blocks of its expert."""
        mops, stk = _import_kernels()
        block_rows = padded_rows // BLOCK
        blocks_per_row = self.hidden_dim // BLOCK
        device = padded_bins.device
        offsets = torch.arange(0, block_rows * blocks_per_row + 1, blocks_per_row, dtype=torch.int32, device=device)
        column_indices = mops.topology(padded_bins, BLOCK, block_rows, blocks_per_row)  # [nnz] int16
        data = torch.empty(column_indices.numel(), BLOCK, BLOCK, dtype=self.w1.dtype, device="meta")  # shape only
        shape = (padded_rows, self.num_experts * self.hidden_dim)
        row_indices = stk.ops.row_indices(shape, data, offsets, column_indices)
        # Transposed metadata (for the backward products): blocks ordered by column, then row.
        block_order = torch.sort(column_indices.int(), stable=True).indices  # [nnz]
        column_indices_t = row_indices.gather(0, block_order)
        columns = column_indices.long()  # a scatter-add, not bincount, which reads its max to the host on CUDA
        per_column = torch.zeros(shape[1] // BLOCK, dtype=torch.int64, device=device).scatter_add_(
            0, columns, torch.ones_like(columns)
        )
        offsets_t = torch.cat([offsets.new_zeros(1), torch.cumsum(per_column, 0).to(torch.int32)])
        return stk.Matrix(
            shape, data, row_indices, column_indices, offsets, column_indices_t, offsets_t, block_order.int()
        )

    def _dense_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """w1, w3 as [D, E·F] (column e·F+f = w[e, :, f]) and w2 as [E·F, D], in `dtype`: views of the parameters.

        w1 and w3 are stored hidden-major, so w.transpose(1, 2) is a contiguous [E, F, D], i.e. [E·F, D], and
        its transpose is the [D, E·F] operand, strides (1, D), that stk's sdd takes (MegaBlocks' own dMoE
        passes its [E·F, D] weights transposed the same way). w2 [E, F, D] is [E·F, D] as it is. Nothing is
        copied when `dtype` is the parameters' dtype; otherwise the one copy is the cast autocast would make
        anyway, written in this layout. A parameter whose storage was replaced by a contiguous one (DeepSpeed
        ZeRO-1/2 flattens parameters into its buffers) is relaid out by that same single copy.
        """
        e, d, f = self.w1.shape

        def rows(w: torch.Tensor) -> torch.Tensor:  # [E, F, D] -> [E·F, D] in `dtype`, a view where possible
            # (`to` ignores memory_format when it has nothing to cast, so that case asks `contiguous`)
            w = w.contiguous() if w.dtype == dtype else w.to(dtype, memory_format=torch.contiguous_format)
            return w.view(e * f, d)

        return rows(self.w1.transpose(1, 2)).t(), rows(self.w3.transpose(1, 2)).t(), rows(self.w2)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:  # [N, D] -> [N, D]
        _, stk = _import_kernels()
        counts = tokens_per_expert.to(x.device)
        padded = (counts + BLOCK - 1) // BLOCK * BLOCK  # [E] group sizes rounded up to the block
        # stk sizes its sparse matrices on the host: one sync for both sizes
        kept, padded_rows = torch.stack([counts.sum(), padded.sum()]).tolist()
        starts = torch.cumsum(counts, 0) - counts
        padded_starts = torch.cumsum(padded, 0) - padded
        expert_of_row = torch.repeat_interleave(  # [M] expert of each kept row
            torch.arange(self.num_experts, device=x.device), counts, output_size=kept
        )
        rows = torch.arange(kept, device=x.device)
        dest = rows - starts[expert_of_row] + padded_starts[expert_of_row]  # [M] row in the padded layout
        xp = x.new_zeros(padded_rows, self.dim).index_copy(0, dest, x[:kept])  # [P, D], pad rows are zero

        topo = self._topology(torch.cumsum(padded, 0).to(torch.int32), padded_rows)
        w1, w3, w2 = self._dense_weights(x.dtype)
        gate = stk.ops.sdd(xp, w1, topo)  # sparse [P, E·F]
        up = stk.ops.sdd(xp, w3, topo)
        act = stk.Matrix(
            gate.size(),
            F.silu(gate.data),
            gate.row_indices,
            gate.column_indices,
            gate.offsets,
            gate.column_indices_t,
            gate.offsets_t,
            gate.block_offsets_t,
        )
        out = stk.ops.dsd(stk.ops.mul(act, up), w2)  # [P, D]
        routed = out.index_select(0, dest)  # [M, D], padding dropped
        return torch.cat([routed, routed.new_zeros(x.shape[0] - kept, self.dim)])  # [N, D], dropped slots zero
