"""The input layouts of QuipLinear / QuipLinearGroup: one function `overload` per layout.

An overload name spells the layout: `[FMT-]MODE_bBITS_kIO[_tFORMS][_FLAGS][_r3]`, e.g.
`repack4_b2_k22_tdd_so_r3` (grid: no prefix, as in files written before formats existed) or
`e8p-repack4_b2_k12_so`. The weight inputs after x are the format's (formats.Lowering):
grid: codes, scale, zero; e8p: codes, scale.
"""
from __future__ import annotations

from dataclasses import dataclass

from .formats import get_lowering

FORMS = ("k", "d")
# How a transform is applied (the `t` part of an overload):
#   k: Kronecker factors, one small MatMul per factor (any n);
#   d: one dense MatMul by the matrix built in the body from the layer's factors (out side:
#      with the output signs folded in); folded per layer at session creation (n <= 256);

ATTRS = ("bits", "in_features", "out_features", "block_size", "accuracy_level")
# QuipLinearGroup: out_features is the total (MatMulNBits' N); out_split the parts' sizes
GROUP_ATTRS = ATTRS + ("out_split", "in_transform", "out_transforms", "layer_names")
FORMAT_ATTR = "format"   # a string attribute on nodes of any format but grid (absent: grid)


def side_inputs(side: str, form: str, count: int) -> list[str]:
    return [f"{side}_factor{i}" for i in range(count)]


def _split_mode(token: str) -> tuple[str, str]:
    fmt, _, mode = token.rpartition("-")
    return fmt or "grid", mode


def _prefix(fmt: str) -> str:
    return "" if fmt == "grid" else f"{fmt}-"


@dataclass(frozen=True)
class Variant:
    mode: str          # the format's weight-product mode (grid: nbits | repack4 | unpack)
    bits: int
    n_in: int          # Kronecker factors given for the input transform
    n_out: int
    in_scale: bool
    out_signs: bool
    bias: bool
    rank3: bool = False  # x is (batch, seq, n): keeps the leading axes, no dynamic shape ops
    in_form: str = "k"
    out_form: str = "k"
    fmt: str = "grid"    # code format (quipc_runtime.formats)

    @property
    def overload(self) -> str:
        flags = "".join(c for c, on in (("s", self.in_scale), ("o", self.out_signs), ("b", self.bias)) if on)
        forms = "" if self.in_form + self.out_form == "kk" else f"_t{self.in_form}{self.out_form}"
        return (f"{_prefix(self.fmt)}{self.mode}_b{self.bits}_k{self.n_in}{self.n_out}{forms}"
                + (f"_{flags}" if flags else "") + ("_r3" if self.rank3 else ""))

    @staticmethod
    def parse(overload: str) -> "Variant":
        """The inverse of `overload` (also reads files written before the `t` forms)."""
        mode, bits, k, *rest = overload.split("_")
        fmt, mode = _split_mode(mode)
        forms, flags = "kk", ""
        for part in rest:
            if part.startswith("t"):
                forms = part[1:]
            elif part != "r3":
                flags = part
        return Variant(mode, int(bits[1:]), int(k[1]), int(k[2]), "s" in flags, "o" in flags, "b" in flags,
                       "r3" in rest, forms[0], forms[1], fmt)

    def weight_keys(self) -> list[str]:
        return list(get_lowering(self.fmt).weight_keys)

    def input_names(self) -> list[str]:
        names = ["x"] + self.weight_keys()
        names += ["in_scale"] * self.in_scale + ["out_sign_bits"] * self.out_signs
        names += side_inputs("in", self.in_form, self.n_in) + side_inputs("out", self.out_form, self.n_out)
        return names + ["bias"] * self.bias


@dataclass(frozen=True)
class GroupVariant:
    """QuipLinearGroup: layers reading the same x with equal in_scale and input transform.
    All parts share format, mode, bits, rank3 and the input side (taken from parts[0]);
    stacked: the output transforms run once on the concatenated outputs."""
    parts: tuple[Variant, ...]
    stacked: bool = False

    @property
    def overload(self) -> str:
        v = self.parts[0]
        head = f"{_prefix(v.fmt)}{v.mode}_b{v.bits}_i{v.in_form}{v.n_in}" + ("s" if v.in_scale else "")
        outs = "".join(f"_o{p.out_form}{p.n_out}" + "o" * p.out_signs + "b" * p.bias for p in self.parts)
        return head + outs + ("_st" if self.stacked else "") + ("_r3" if v.rank3 else "")

    @staticmethod
    def parse(overload: str) -> "GroupVariant":
        mode, bits, head, *rest = overload.split("_")
        fmt, mode = _split_mode(mode)
        rank3 = "r3" in rest
        parts = tuple(Variant(mode, int(bits[1:]), int(head[2]), int(o[2]), head.endswith("s"), "o" in o[3:],
                              "b" in o[3:], rank3, head[1], o[1], fmt) for o in rest if o not in ("r3", "st"))
        return GroupVariant(parts, "st" in rest)

    def shared_names(self) -> list[str]:
        v = self.parts[0]
        return ["x"] + ["in_scale"] * v.in_scale + side_inputs("in", v.in_form, v.n_in)

    def part_names(self, i: int) -> list[str]:
        v = self.parts[i]
        names = v.weight_keys() + ["out_sign_bits"] * v.out_signs
        names += side_inputs("out", v.out_form, v.n_out) + ["bias"] * v.bias
        return [f"p{i}.{k}" for k in names]

    def input_names(self) -> list[str]:
        return self.shared_names() + [k for i in range(len(self.parts)) for k in self.part_names(i)]
