"""Proxy Hessians H = E[x x^T] of linear-layer inputs, and making them usable."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch


class HessianAccumulator:
    """Running sum of x x^T over calibration tokens, in float64. The first batch's x^T x
    becomes the sum itself (0 + x == x + 0.0, the sign of zeros included): no zero matrix
    beside it."""

    def __init__(self, n: int, device: torch.device | str = "cpu"):
        self.n, self.device = n, device
        self.sum: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        # float32 product per batch (fast), float64 running sum (no drift over many batches)
        self.add_partial(gram_float64(x), x.shape[0])

    def add_partial(self, total: torch.Tensor, count: int) -> None:
        """One batch's x^T x (float64) and its row count, summed in by the caller in batch order
        (the first batch's tensor is taken over as the sum)."""
        if self.sum is None:
            self.sum = total.add_(0.0)
        else:
            self.sum += total
        self.count += count

    def _total(self) -> torch.Tensor:
        if self.sum is None:
            self.sum = torch.zeros(self.n, self.n, dtype=torch.float64, device=self.device)
        return self.sum

    def mean(self) -> torch.Tensor:
        return self._total() / max(self.count, 1)

    def mean_(self) -> torch.Tensor:
        """mean() computed in the running sum's memory (the accumulator is spent)."""
        return self._total().div_(max(self.count, 1))


def batch_partial(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x^T x of one batch, as HessianAccumulator.add computes it (float32 product, float64)."""
    x = x.detach().reshape(-1, x.shape[-1]).float()
    return gram_float64(x), x.shape[0]


def gram_float64(x: torch.Tensor) -> torch.Tensor:
    """(x^T x).double() for a 2-D float32 x without the float32 product beside its float64
    copy (a 7B down_proj's are 485 + 969 MB): the product is written into the first half of
    the float64 result's memory and widened in place from the end, in segments [a, b), b <= 2a,
    whose float64 slots lie past every float32 value still to be read. The same floats."""
    n = x.shape[1]
    out = torch.empty(n, n, dtype=torch.float64, device=x.device)
    if out.numel() == 0:
        return out
    wide = out.view(-1)
    narrow = wide.view(torch.float32)[:n * n]
    torch.mm(x.t(), x, out=narrow.view(n, n))
    end = n * n
    while end > 1:
        start = (end + 1) // 2
        wide[start:end].copy_(narrow[start:end])
        end = start
    wide[0] = narrow[0].item()
    return out


def reduce_in_batch_order(group, n_batches: int, partials_of, dims: list[int], device) -> list[HessianAccumulator]:
    """Sum per-batch partial Hessians over all ranks, in batch order 0, 1, 2, ... whatever the
    number of ranks (so the float sums are those of one process). Batch b is computed by rank
    group.owner(b): `partials_of(b)` gives its [(x^T x, rows)] per accumulator. Rounds of
    group.world batches: each owner broadcasts its partials, every rank adds them in order,
    so a rank holds one batch's partials at a time."""
    accs = [HessianAccumulator(n, device) for n in dims]
    for start in range(0, n_batches, group.world):
        mine = partials_of(start + group.rank) if start + group.rank < n_batches else None
        for owner in range(min(group.world, n_batches - start)):
            for g, acc in enumerate(accs):
                if owner == group.rank:
                    total, count = mine[g]
                else:
                    total, count = torch.empty(acc.n, acc.n, dtype=torch.float64, device=acc.device), 0
                counted = torch.tensor([count], dtype=torch.int64, device=acc.device)
                group.broadcast_(total, owner)
                group.broadcast_(counted, owner)
                acc.add_partial(total, int(counted.item()))
    return accs


# From this size on, an in-place regularize with a scratch folder tests positive definiteness
# in H's own memory (H kept on disk meanwhile) rather than in an n x n copy (a 7B down_proj's
# H is 969 MB).
SCRATCH_TEST_BYTES = 256 * 2**20


class _PositiveDefiniteTest:
    """Whether H (symmetric, float64) is positive definite, by a Cholesky factorization: of a
    copy, or (`scratch_dir`, H at least SCRATCH_TEST_BYTES) in H's own memory, H written to an
    unlinked file in scratch_dir once and read back after each test (the same decisions, no
    n x n matrix besides H)."""

    def __init__(self, h: torch.Tensor, scratch_dir: str | Path | None = None):
        self.h = h
        self.saved = None
        big = h.numel() * h.element_size() >= SCRATCH_TEST_BYTES
        if scratch_dir is not None and big and h.device.type == "cpu":
            self.square = h if h.is_contiguous() else h.t()    # H or H^T (the same matrix)
            if not self.square.is_contiguous():
                return
            try:
                Path(scratch_dir).mkdir(parents=True, exist_ok=True)
                self.saved = tempfile.TemporaryFile(dir=scratch_dir, prefix="hessian-test-")
                self.saved.write(memoryview(self.square.numpy()).cast("B"))
                self.saved.flush()
            except OSError:      # no room (or no folder) on disk: the test on a copy
                self.close()
                self.saved = None

    def __call__(self) -> bool:
        if self.saved is None:
            return torch.linalg.cholesky_ex(self.h).info == 0
        a = self.square.t()       # Fortran-ordered: LAPACK factors it where it lies
        ok = torch.linalg.cholesky_ex(a, out=(a, torch.empty((), dtype=torch.int32))).info == 0
        self.saved.seek(0)
        if self.saved.readinto(memoryview(self.square.numpy()).cast("B")) != self.square.numel() * 8:
            raise OSError("could not read the Hessian back from its scratch file")
        return ok

    def close(self) -> None:
        if self.saved is not None:
            self.saved.close()


def regularize(h: torch.Tensor, damp: float, name: str = "layer", in_place: bool = False,
               scratch_dir: str | Path | None = None) -> tuple[torch.Tensor, dict]:
    """Damped, positive definite H. Dead inputs (zero diagonal) and an all-zero H are
    not errors (too little calibration): they get damping, or H = I as a last resort.
    in_place: a float64 H is damped in its own memory (the caller is done with it); with
    scratch_dir too, a large H is also tested there (_PositiveDefiniteTest)."""
    if not all(torch.isfinite(h[r0:r0 + 1024]).all() for r0 in range(0, h.shape[0], 1024)):
        raise ValueError(f"{name}: the calibration Hessian holds NaN or Inf "
                         "(the model produced non-finite activations)")
    h = h.to(torch.float64, copy=not in_place)
    n = h.shape[0]
    diag = torch.diagonal(h)
    info = {"damp": damp, "dead_inputs": int((diag <= 0).sum())}
    mean = float(diag.clamp_min(0).mean())
    if mean <= 0:
        info["fallback"] = "zero Hessian: identity used"
        return torch.eye(n, dtype=torch.float64, device=h.device), info
    dead = diag <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = mean
    diag0 = torch.diagonal(h).clone()
    test = _PositiveDefiniteTest(h, scratch_dir if in_place else None)
    try:
        for attempt in range(6):
            lam = damp * (10 ** attempt) if damp > 0 else (0 if attempt == 0 else 1e-6 * 10 ** attempt)
            # H + lam * mean * I in H's own memory (the undamped diagonal restored between attempts)
            torch.diagonal(h).copy_(diag0).add_(lam * mean)
            if test():
                torch.diagonal(h).copy_(diag0).add_(lam * mean)   # (read back from disk: undamped)
                info["damp"] = lam
                return h, info
    finally:
        test.close()
    info["fallback"] = "not positive definite after damping: identity used"
    return mean * torch.eye(n, dtype=torch.float64, device=h.device), info
