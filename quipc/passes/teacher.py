"""The unquantized model's logits for fine-tuning, without a second copy of the model.

While the sequential pass holds block i in floating point (before rounding it), the
calibration windows' fp hidden states go through it too, one window per forward as a plain
`model(input_ids=window[None])` runs them; after the last block, the final norm and lm_head
turn them into exactly the logits that forward gives (tests/test_streaming.py). Each rank
carries its own windows (window w on rank group.owner(w)); all ranks gather them at the end.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from ..distributed import Group


class TeacherStates:
    """fp hidden states of the calibration windows, advanced block by block."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor, device, group: Group):
        from .sequential import capture_first_block_inputs

        self.inputs = capture_first_block_inputs(model, blocks, windows, 1, device, group)
        self.windows = windows

    def step(self, fp_block: nn.Module) -> None:
        from .sequential import run_block

        self.inputs.hidden = run_block(fp_block, self.inputs)

    def gather(self, group: Group) -> dict[int, torch.Tensor]:
        """{window index: final hidden state (before the last norm)} on every rank (each fine-tunes
        on some of the windows)."""
        mine = {w: h.cpu() for w, h in zip(self.inputs.batch_ids, self.inputs.hidden)}
        return {w: h for part in group.all_gather_object(mine) for w, h in part.items()}


class TeacherLogits(nn.Module):
    """Stands in for the fp model in finetune_e2e: teacher(input_ids=window[None]).logits of
    a calibration window, from its stored final hidden state."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module, windows: torch.Tensor, hidden: dict[int, torch.Tensor]):
        super().__init__()
        self.norm, self.lm_head = norm, lm_head
        self._hidden = {windows[w].numpy().tobytes(): h for w, h in hidden.items()}

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        if input_ids.shape[0] != 1 or input_ids.numpy().tobytes() not in self._hidden:
            raise ValueError("the teacher's logits are known for the calibration windows only, one at a time")
        h = self._hidden[input_ids[0].numpy().tobytes()]
        return SimpleNamespace(logits=self.lm_head(self.norm(h)))
