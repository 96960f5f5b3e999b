"""Nearest-point search in the E8P and E8 one-bit codebooks (quipc_runtime.formats.lattice).

E8P has 2^16 points but a structure that makes the search cheap: for each shift (+-1/4)
and each of the 256 sources a, the best signs are those of u = x - shift, except that
the number of minus signs must have the parity of sum(a); when it does not, the cheapest
fix flips the coordinate with the smallest a_i |u_i| (cost 4 a_i |u_i|). So a search is
2 x 256 candidates, not 65536.
"""
from __future__ import annotations

import torch

from quipc_runtime.formats.lattice import e8_one_bit_table, e8p_source_parity, e8p_sources

CHUNK = 4096  # vectors per search step (bounds the (chunk, 256, 8) temporary)


class E8PSearch:
    def __init__(self, dtype=torch.float32):
        self.src = torch.from_numpy(e8p_sources()).to(dtype)              # (256, 8)
        self.src_t = self.src.t().contiguous()
        self.src_norm = (self.src ** 2).sum(1)
        self.parity = torch.from_numpy(e8p_source_parity()).to(torch.int64)
        self.bit = 2 ** torch.arange(7, dtype=torch.int64)

    def nearest(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, 8) -> (16-bit indices (N,) int64, points (N, 8))."""
        if x.shape[0] > CHUNK:
            parts = [self.nearest(x[i:i + CHUNK]) for i in range(0, x.shape[0], CHUNK)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        x = x.to(self.src.dtype)
        rows = torch.arange(x.shape[0])
        best = None
        for shift_bit, shift in ((0, 0.25), (1, -0.25)):
            u = x - shift
            au = u.abs()
            cost = (au ** 2).sum(1, keepdim=True) - 2 * au @ self.src.t() + self.src_norm   # (N, 256)
            neg = u < 0
            wrong = (neg.sum(1, keepdim=True) % 2) != self.parity[None, :]
            penalty = au[:, :1] * self.src_t[0]
            for i in range(1, 8):   # min over coordinates, as 8 (N, 256) products: no (N, 256, 8) temporary
                penalty = torch.minimum(penalty, au[:, i:i + 1] * self.src_t[i])
            cost = cost + wrong * (4 * penalty)
            c, s = cost.min(1)
            flip = wrong[rows, s]
            j = (au * self.src[s]).argmin(1)
            neg[rows[flip], j[flip]] = ~neg[rows[flip], j[flip]]
            point = self.src[s] * (1 - 2 * neg.to(x.dtype)) + shift
            index = s + ((neg[:, :7].to(torch.int64) * self.bit).sum(1) << 8) + (shift_bit << 15)
            if best is None:
                best = (c, index, point)
            else:
                take = c < best[0]
                best = (torch.where(take, c, best[0]), torch.where(take, index, best[1]),
                        torch.where(take[:, None], point, best[2]))
        return best[1], best[2]


class TableSearch:
    """Brute-force nearest point of a small table (the 256-point E8 one-bit codebook)."""

    def __init__(self, table, dtype=torch.float32):
        self.table = torch.as_tensor(table).to(dtype)
        self.norm = (self.table ** 2).sum(1)

    def nearest(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.table.dtype)
        index = (self.norm[None, :] - 2 * x @ self.table.t()).argmin(1)
        return index, self.table[index]


def stage_search(kind: str, dtype=torch.float32):
    return E8PSearch(dtype) if kind == "e8p" else TableSearch(e8_one_bit_table(), dtype)
