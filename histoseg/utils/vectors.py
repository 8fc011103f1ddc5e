"""How 2-D offset vectors (HoVer-Net ``(h, v)`` maps) turn with the image, in one place and torch-only: used by
the batch augmentation (:func:`histoseg.aug.gpu.dihedral_hv`) and the test-time inverse
(:func:`histoseg.inference.tiled.with_tta`), which must not pull each other's packages in."""
from __future__ import annotations


def turn_offsets(h, v, quarter_turns: int):
    """The offset vectors ``(h, v)`` after ``quarter_turns`` turns of ``torch.rot90`` on ``(H, W)``: each turn maps
    ``(h, v)`` to ``(v, -h)``; ``4 - k`` turns undo ``k``. Works on tensors or arrays."""
    for _ in range(int(quarter_turns) % 4):
        h, v = v, -h
    return h, v
