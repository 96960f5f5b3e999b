"""Inline cheap elementwise producers (input prescale, per-row affine) into their consumers."""
OPS = ("inline",)


def apply(sch, block) -> bool:
    try:
        sch.compute_inline(block)
        return True
    except Exception:
        return False
