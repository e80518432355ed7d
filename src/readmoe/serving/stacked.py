"""Linear layers that read the same input, stacked by rows into one weight (q/k/v; gate and up).

On a CPU a small matmul costs mostly its call, so one matmul over the stack beats one per layer. The
layers' own weights become views of the stack: no memory is added, which matters at 7B, and whoever
stacks the same layers again (a later engine on the same model) finds the stack in place.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def stack_rows(mods: list) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(stacked weight, stacked bias or None); the modules' weights become views of the stack. Biases are
    stacked only when some layer has one (zeros stand in for a missing one)."""
    ws = [m.weight for m in mods]
    if _views_of_one(ws):
        w = ws[0].as_strided((sum(x.shape[0] for x in ws), ws[0].shape[1]), ws[0].stride())
    else:
        w, i = torch.cat(ws), 0
        for m in mods:
            n = m.weight.shape[0]
            m.weight.data = w[i:i + n]
            i += n
    bs = [m.bias for m in mods]
    b = None if all(x is None for x in bs) else torch.cat(
        [x.detach() if x is not None else m.weight.new_zeros(m.weight.shape[0]) for x, m in zip(bs, mods)])
    return w, b


def _views_of_one(ws: list[torch.Tensor]) -> bool:
    """Whether row-major weights already lie back to back in one storage, in this order."""
    for a, b in zip(ws, ws[1:]):
        if not (a.is_contiguous() and b.is_contiguous() and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
                and b.data_ptr() == a.data_ptr() + a.numel() * a.element_size()):
            return False
    return ws[0].is_contiguous()
