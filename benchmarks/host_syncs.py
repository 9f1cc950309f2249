"""Host syncs in an MoE layer's forward + backward, counted on CPU as CUDA would pay them.

    .venv/bin/python benchmarks/host_syncs.py

A CPU run cannot stall on the device, so `HostSyncs` counts the calls that block the host on
CUDA: the device-to-host reads (`aten._local_scalar_dense`: `.item()`, `int()`, `bool()` of a
tensor; and `Tensor.tolist()`, which on CPU reads memory without dispatching any op, so it is
counted at the Python level) and the ops whose output size depends on the data (`nonzero`,
`masked_select`, boolean-mask indexing, `repeat_interleave` without `output_size`). Backward ops
are counted too: the dispatch mode follows the autograd engine into the backward.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_ALWAYS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default}
_READS = {torch.Tensor.tolist}


def _syncs(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether aten op `func` with these arguments blocks the host on CUDA."""
    if func in _ALWAYS:
        return True
    if func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        indices = args[1]
        return any(i is not None and i.dtype == torch.bool for i in indices)
    return False


class _Dispatch(TorchDispatchMode):
    def __init__(self, record: Callable[[str], None]) -> None:
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if _syncs(func, args, kwargs):
            self.record(str(func))
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, record: Callable[[str], None]) -> None:
        super().__init__()
        self.record = record

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        if func in _READS:
            self.record(func.__name__)
        return func(*args, **(kwargs or {}))


class HostSyncs:
    """Context manager; `.calls` lists every host sync inside it by op name, `.count` their number."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._modes = (_Function(self.calls.append), _Dispatch(self.calls.append))

    @property
    def count(self) -> int:
        return len(self.calls)

    def __enter__(self) -> HostSyncs:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


def moe_layer_syncs(backend: str, capacity_factor: float | None, bf16: bool = False) -> HostSyncs:
    """Host syncs of one forward + backward of a small MoE layer (top-2 of 4 experts, 64 tokens)."""
    from llamoe.moe.config import MoEConfig
    from llamoe.moe.layer import MoE

    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden_dim=32, backend=backend, capacity_factor=capacity_factor)
    layer = MoE(16, cfg)
    layer.init_weights(0.2, 0.1)
    x = torch.randn(2, 32, 16, requires_grad=True)
    with HostSyncs() as syncs, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = layer(x)
        (out.out.float().square().sum() + out.aux_loss).backward()
    return syncs


def main() -> None:
    print("| backend | capacity_factor | host syncs (forward + backward) | which |")
    print("|---|---|---:|---|")
    for backend in ("grouped_mm", "torch"):
        for capacity in (None, 1.0):
            syncs = moe_layer_syncs(backend, capacity)
            print(f"| {backend} | {capacity} | {syncs.count} | {', '.join(sorted(set(syncs.calls))) or '-'} |")


if __name__ == "__main__":
    main()
