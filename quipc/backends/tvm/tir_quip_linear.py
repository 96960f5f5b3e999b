"""The QuIP linear layer as a TE/TIR computation: unpack + dequantize fused into the matmul.

    y = s_out * K_out^T ( W' ( K_in (in_scale * x) ) ) + bias,   W'[i, j] = scale[i] code[i, j] + zero[i]

is computed as
    z   = K_in (in_scale * x)                 (one small "kron" stage per Kronecker factor)
    acc = code . z                            (codes unpacked from the packed words in the loop)
    t   = scale * acc + zero * sum(z)         (the per-row affine part, applied once per row)
    y   = s_out * K_out^T t + bias (+ residual)

No dense weight exists at run time: the GEMV reads packed words directly; the GEMM schedule
dequantizes one 16-row tile of codes at a time into a small local buffer.

Code layout used by the TVM backend (repacked at compile time from the artifact's layout, same
number of bits per weight): rows are padded to a multiple of TILE_O and interleaved in tiles
of TILE_O rows, columns padded to a multiple of K_GROUP. A "plane" of width w holds w bits of
every code, 32 / w codes per int32 word, code j of a word at bits [w*j, w*j + w) (width 4:
at 8 (j % 4) + 4 (j // 4), so that a word's bytes are 4 columns' low and 4 columns' high
nibbles, the order the int8 GEMV of gemv_i8.py reads):
    plane[o // TILE_O, k // (32 / w), o % TILE_O]
2 and 4 bits use one plane; 3 bits use two (the low 2 bits and the high bit), so the codes of
one word line up with the vector lanes (16 rows) and unpack with a shift and a mask.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from quipc_runtime.formats import require_format
from tvm import te, tirx

from . import gemv_i8

TILE_O = 16
K_GROUP = 32
PARTS = 4  # partial sums of the GEMV (independent FMA chains)
PLANES = {2: ((0, 2),), 3: ((0, 2), (2, 1)), 4: ((0, 4),)}  # (shift in the code, width)
SHARED = ()  # no arrays shared by all layers (see lowering.py)


def _ceil_to(v: int, m: int) -> int:
    return -(-v // m) * m


@dataclass(frozen=True)
class LinearSpec:
    """Shapes and options of one quantized linear: everything its kernel is specialized on."""
    m: int
    n: int
    bits: int
    in_orders: tuple = ()
    out_orders: tuple = ()
    in_scale: bool = False
    out_sign: bool = False
    bias: bool = False
    format: str = "grid"  # the layer's code format: which lowering (module) builds its kernel
    int8_acts: bool = False  # decode GEMV on int8 activations (gemv_i8; 4-bit planes, AVX2 targets)

    @property
    def o_pad(self) -> int:
        return _ceil_to(self.m, TILE_O)

    @property
    def k_pad(self) -> int:
        return _ceil_to(self.n, K_GROUP)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def of(layer) -> "LinearSpec":
        def orders(t):
            return tuple(int(m.shape[0]) for m in factor_matrices(t))
        from .lowering import LOWERINGS

        require_format(layer, tuple(LOWERINGS), "the TVM backend")
        return LinearSpec(layer.out_features, layer.in_features, layer.bits, orders(layer.t_in),
                          orders(layer.t_out), layer.in_scale is not None,
                          layer.t_out.signs is not None, layer.bias is not None, layer.format)


MAX_FACTOR = 64


def _split_pow2(order: int) -> list[int]:
    """Factors of a power of two, each <= 64 and >= 8 (so every stage vectorizes by 8)."""
    parts = []
    while order > MAX_FACTOR:
        if order // MAX_FACTOR >= 8:
            parts.append(MAX_FACTOR)
            order //= MAX_FACTOR
        else:
            return parts + [order // 8, 8]
    return parts + [order]


def factor_matrices(t) -> list[np.ndarray]:
    """The transform's Kronecker factors, with large power-of-two Hadamard factors split into
    factors of order <= 64 (Sylvester: H_ab = H_a x H_b), which turns an O(n^2) factor into a
    few O(n * 64) stages. The split is checked numerically and skipped if it does not hold."""
    if t.kind == "identity":
        return []
    mats = [m for m in t.matrices() if m.shape[0] > 1]
    if t.kind != "hadamard":
        return mats
    from quipc_runtime.hadamard import hadamard

    out = []
    for mat in mats:
        o = mat.shape[0]
        if o > MAX_FACTOR and o & (o - 1) == 0:
            parts = [(hadamard(p) / np.sqrt(p)).astype(np.float32) for p in _split_pow2(o)]
            k = np.ones((1, 1), np.float64)
            for p in parts:
                k = np.kron(k, p.astype(np.float64))
            if np.allclose(k, mat, atol=1e-6):
                out.extend(parts)
                continue
        out.append(mat)
    return out


def repack_codes(codes: np.ndarray, bits: int) -> list[np.ndarray]:
    """(m, n) integer codes -> the planes described in the module docstring (int32)."""
    m, n = codes.shape
    o_pad, k_pad = _ceil_to(m, TILE_O), _ceil_to(n, K_GROUP)
    full = np.zeros((o_pad, k_pad), np.uint32)
    full[:m, :n] = codes
    out = []
    for shift, width in PLANES[bits]:
        cpw = 32 // width
        part = (full >> np.uint32(shift)) & np.uint32((1 << width) - 1)
        part = part.reshape(o_pad, k_pad // cpw, cpw)
        at = np.array([_bit_of(width, j) for j in range(cpw)], dtype=np.uint32)
        words = np.bitwise_or.reduce(part << at, axis=-1)
        words = words.reshape(o_pad // TILE_O, TILE_O, k_pad // cpw).transpose(0, 2, 1)
        out.append(np.ascontiguousarray(words).view(np.int32))
    return out


def _stages(orders: tuple) -> list[tuple[int, int]]:
    """(factor index, stride Q) for each factor, last axis first."""
    res = []
    for i in reversed(range(len(orders))):
        res.append((i, int(np.prod(orders[i + 1:], dtype=np.int64))))
    return res


def stage_matrix(mat: np.ndarray, stride: int, transpose: bool) -> np.ndarray:
    """The stored form of one stage's factor: M = F (input side) or F^T (output side), kept as
    M^T when the stage vectorizes across the factor's own index (stride 1)."""
    m = mat.T if transpose else mat
    return np.ascontiguousarray(m.T if stride == 1 else m, dtype=np.float32)


def linear_params(layer, spec: LinearSpec | None = None) -> dict[str, np.ndarray]:
    """The arrays the kernel takes, in the order of `param_names(spec)`."""
    from quipc_runtime.packing import unpack

    spec = spec or LinearSpec.of(layer)
    if spec.format != "grid":
        raise ValueError(f"layer {layer.name} is stored as {spec.format!r}: use lowering.lowering(spec.format)")
    codes = unpack(layer.codes, layer.bits, layer.in_features)
    out = {f"plane{i}": p for i, p in enumerate(repack_codes(codes, layer.bits))}
    pad = spec.o_pad - spec.m
    out["scale"] = np.pad(layer.scale.astype(np.float32), (0, pad))
    out["zero"] = np.pad(layer.zero.astype(np.float32), (0, pad))
    out.update(transform_params(layer, spec))
    return out


def transform_params(layer, spec: LinearSpec) -> dict[str, np.ndarray]:
    """The format-independent arrays: input scale, transform factors, output signs, bias."""
    out = {}
    if spec.in_scale:
        out["in_scale"] = layer.in_scale.astype(np.float32)
    mats_in = factor_matrices(layer.t_in)
    for i, q in _stages(spec.in_orders):
        out[f"fin{i}"] = stage_matrix(mats_in[i], q, False)
    mats_out = factor_matrices(layer.t_out)
    for i, q in _stages(spec.out_orders):
        out[f"fout{i}"] = stage_matrix(mats_out[i], q, True)
    if spec.out_sign:
        out["out_sign"] = layer.t_out.sign_vector().astype(np.float32)
    if spec.bias:
        out["bias"] = layer.bias.astype(np.float32)
    return out


def param_names(spec: LinearSpec) -> list[str]:
    return [f"plane{i}" for i in range(len(PLANES[spec.bits]))] + ["scale", "zero"] + transform_names(spec)


def transform_names(spec: LinearSpec) -> list[str]:
    names = ["in_scale"] if spec.in_scale else []
    names += [f"fin{i}" for i, _ in _stages(spec.in_orders)]
    names += [f"fout{i}" for i, _ in _stages(spec.out_orders)]
    if spec.out_sign:
        names.append("out_sign")
    if spec.bias:
        names.append("bias")
    return names


def param_shapes(spec: LinearSpec) -> dict[str, tuple]:
    shapes = {}
    for i, (_, width) in enumerate(PLANES[spec.bits]):
        shapes[f"plane{i}"] = (spec.o_pad // TILE_O, spec.k_pad // (32 // width), TILE_O)
    shapes["scale"] = shapes["zero"] = (spec.o_pad,)
    return {**shapes, **transform_shapes(spec)}


def transform_shapes(spec: LinearSpec) -> dict[str, tuple]:
    shapes = {}
    if spec.in_scale:
        shapes["in_scale"] = (spec.n,)
    for i, _ in _stages(spec.in_orders):
        shapes[f"fin{i}"] = (spec.in_orders[i],) * 2
    for i, _ in _stages(spec.out_orders):
        shapes[f"fout{i}"] = (spec.out_orders[i],) * 2
    if spec.out_sign:
        shapes["out_sign"] = (spec.m,)
    if spec.bias:
        shapes["bias"] = (spec.m,)
    return shapes


def _kron_stage(inp, mat, f: int, q: int, n: int, name: str):
    """out[b, k] = sum_r M[ik, r] in[b, k + (r - ik) q], ik = (k // q) % f."""
    rows = inp.shape[0]
    r = te.reduce_axis((0, f), name="r")
    vec = int(q % 8 == 0 or (q == 1 and f % 8 == 0))

    whole = f * q == n  # the outermost factor: k // q < f already

    def body(b, k):
        ik = k // q if whole else (k // q) % f
        coef = mat[r, ik] if q == 1 else mat[ik, r]
        # one factor over the whole vector reads in[b, r]: spelled k + (r - k), TVM's region
        # analysis of the inlined producer divided by zero (a hidden size of 64, issue 11)
        src = r if whole and q == 1 else k + (r - ik) * q
        return te.sum(coef * inp[b, src], axis=r)
    return te.compute((rows, n), body, name=name, attrs={"quipc.op": "kron", "quipc.vec": vec})


def _bit_of(width: int, j):
    """Bit offset of code j of a plane word of `width`-bit codes (module docstring): 4-bit codes
    at byte j % 4, the high nibble for j >= 4 (the order gemv_i8 reads), others at width * j."""
    return (j % 4) * 8 + (j // 4) * 4 if width == 4 else width * j


def _code(planes, spec: LinearSpec, ot, oi, kw, kj):
    """The integer code of row ot*TILE_O+oi, column kw*K_GROUP+kj, as int32."""
    val = None
    for plane, (shift, width) in zip(planes, PLANES[spec.bits]):
        cpw = 32 // width
        word = plane[ot, kw * (K_GROUP // cpw) + kj // cpw, oi]
        part = (word >> _bit_of(width, kj % cpw)) & ((1 << width) - 1)
        if shift:
            part = part << shift
        val = part if val is None else val | part
    return val


def quip_linear_te(x, args: dict, spec: LinearSpec, mode: str, residual=None):
    """Build the TE graph. x: (L, n) float32; args: name -> te placeholder (see param_names).
    mode "gemv" (decode, L small) or "gemm" (prefill). Returns y (L, m)."""
    rows = x.shape[0]
    z = te_input_side(x, args, spec, spec.k_pad)
    planes = [args[f"plane{i}"] for i in range(len(PLANES[spec.bits]))]
    n_ot = spec.o_pad // TILE_O
    scale, zero = args["scale"], args["zero"]
    if mode == "gemv" and spec.int8_acts:
        acc_s, zsum_at = gemv_i8.gemv_te(z, planes, spec, rows, "quip_gemv_i8")
        return te_output_side(lambda b, o: scale[o] * acc_s(0, b, o) + zero[o] * zsum_at(b), rows, args,
                              spec, residual)
    zsum = row_sums(z, rows, spec.n)
    if mode == "gemv":
        acc_at = gemv_te(z, planes, spec, rows, "quip_gemv")
    else:
        wdq = te.compute(
            (n_ot, spec.k_pad, TILE_O),
            lambda ot, k, oi: _code(planes, spec, ot, oi, k // K_GROUP, k % K_GROUP).astype("float32"),
            name="quip_dequant_tile", attrs={"quipc.op": "dequant_tile"})
        k = te.reduce_axis((0, spec.k_pad), name="k")
        acc = te.compute((rows, n_ot, TILE_O),
                         lambda b, ot, oi: te.sum(wdq[ot, k, oi] * z[b, k], axis=k),
                         name="quip_gemm", attrs={"quipc.op": "quip_gemm"})

        def acc_at(b, o):
            return acc[b, o // TILE_O, o % TILE_O]
    return te_output_side(lambda b, o: scale[o] * acc_at(b, o) + zero[o] * zsum[b], rows, args, spec,
                          residual)


def row_sums(z, rows, n: int):
    """zsum[b] = sum of z's first n columns (the zero points' term)."""
    kz = te.reduce_axis((0, n), name="kz")
    return te.compute((rows,), lambda b: te.sum(z[b, kz], axis=kz), name="quip_zsum",
                      attrs={"quipc.op": "rowsum"})


def gemv_te(z, planes, spec: LinearSpec, rows, name: str):
    """The decode GEMV of codes in `planes` (spec.bits' layout) with z: returns acc_at(b, o) =
    code[o] . z[b]. PARTS independent partial sums (codes kj = j*PARTS + q go to sum q) so that
    the FMA chains do not serialize on one accumulator (schedules/quip_gemv.py)."""
    n_ot, n_kw = spec.o_pad // TILE_O, spec.k_pad // K_GROUP
    kw = te.reduce_axis((0, n_kw), name="kw")
    kj = te.reduce_axis((0, K_GROUP // PARTS), name="kj")
    part = te.compute(
        (rows, n_ot, PARTS, TILE_O),
        lambda b, ot, q, oi: te.sum(
            _code(planes, spec, ot, oi, kw, kj * PARTS + q).astype("float32")
            * z[b, kw * K_GROUP + kj * PARTS + q], axis=[kw, kj]),
        name=name, attrs={"quipc.op": "quip_gemv"})

    def acc_at(b, o):
        ot, oi = o // TILE_O, o % TILE_O
        tot = part[b, ot, 0, oi]
        for q in range(1, PARTS):
            tot = tot + part[b, ot, q, oi]
        return tot
    return acc_at


def te_input_side(x, args: dict, spec: LinearSpec, width: int):
    """z (L, width) = K_in (in_scale * x), zero-padded to `width` columns, materialized (the
    matmul reads it once per row tile)."""
    rows = x.shape[0]
    n = spec.n
    cur = x
    if spec.in_scale:
        s = args["in_scale"]
        cur = te.compute((rows, n), lambda b, k: cur[b, k] * s[k], name="quip_prescale",
                         attrs={"quipc.op": "inline"})
    for i, q in _stages(spec.in_orders):
        cur = _kron_stage(cur, args[f"fin{i}"], spec.in_orders[i], q, n, f"quip_in{i}")
    if width != n or not spec.in_orders:
        src = cur
        cur = te.compute((rows, width),
                         lambda b, k: tirx.if_then_else(k < n, src[b, tirx.min(k, n - 1)], tirx.const(0.0, "float32")),
                         name="quip_zpad", attrs={"quipc.op": "copy"})
    return cur


def dequant_tile_gemm_te(wval, z, rows, out_tiles: int, n: int, tile: int, fmt: str):
    """The prefill product of a format whose weights decode per element: wdq[ot, k, oi] =
    wval(ot, k, oi) (one `tile`-row tile of W', scales applied), acc = wdq . z with tiled_gemm's
    axis roles; returns t_at(b, o) for te_output_side. Blocks are named <fmt>_dequant_tile and
    <fmt>_gemm (the format's schedule rule finds them by those "quipc.op" names)."""
    wdq = te.compute((out_tiles, n, tile), wval, name=f"{fmt}_dequant_tile",
                     attrs={"quipc.op": f"{fmt}_dequant_tile"})
    k = te.reduce_axis((0, n), name="k")
    acc = te.compute((rows, out_tiles, tile),
                     lambda b, ot, oi: te.sum(wdq[ot, k, oi] * z[b, k], axis=k), name=f"{fmt}_gemm",
                     attrs={"quipc.op": f"{fmt}_gemm", "quipc.axes": "mtl", "quipc.order": "t_outer"})

    def t_at(b, o):
        return acc[b, o // tile, o % tile]
    return t_at


def te_output_side(t_at, rows, args: dict, spec: LinearSpec, residual=None):
    """y (L, m) = s_out * K_out^T t + bias (+ residual), t[b, o] = t_at(b, o) (inlined)."""
    m = spec.m
    cur = te.compute((rows, m), t_at, name="quip_affine", attrs={"quipc.op": "inline"})
    for i, q in _stages(spec.out_orders):
        cur = _kron_stage(cur, args[f"fout{i}"], spec.out_orders[i], q, m, f"quip_out{i}")
    u = cur
    sign = args.get("out_sign") if spec.out_sign else None
    bias = args.get("bias") if spec.bias else None

    def epi(b, o):
        v = u[b, o]
        if sign is not None:
            v = v * sign[o]
        if bias is not None:
            v = v + bias[o]
        if residual is not None:
            v = v + residual[b, o]
        return v
    return te.compute((rows, m), epi, name="quip_out", attrs={"quipc.op": "elementwise"})


def placeholders(spec: LinearSpec, prefix: str = "") -> dict:
    dtypes = {"plane0": "int32", "plane1": "int32"}
    return {k: te.placeholder(shape, dtypes.get(k, "float32"), name=prefix + k)
            for k, shape in param_shapes(spec).items()}


ROW_MULTIPLE = 16


def prefill_rows():
    """The symbolic row count of prefill functions. Callers pad it to a multiple of
    ROW_MULTIPLE: the schedules split rows without a bounds predicate."""
    return tirx.Var("L", "int64")
