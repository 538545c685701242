"""Scoring math on tensors, no I/O: per-token EL2N and NLL over the full vocabulary.

EL2N of a token is ``‖softmax(z) − onehot(y)‖₂``. Writing p = softmax(z) and r = 1 − p_y =
Σ_{k≠y} p_k, the squared norm is Σ_{k≠y} p_k² + r²: two sums of non-negative terms, so no one-hot
is built and nothing cancels (the textbook ``Σp² − 2p_y + 1`` loses every digit when p_y ≈ 1).
Likewise NLL = −log(1 − r) = −log1p(−r) keeps its precision for confident tokens.
Tokens are processed in chunks so memory stays at ``chunk × vocabulary`` whatever the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def token_el2n_nll(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """EL2N and NLL for N tokens: ``logits`` (N, V) in any float dtype, ``target`` (N,) int64.

    Computed in float32 (float64 inputs stay float64); returns two (N,) tensors.
    """
    z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    p = torch.softmax(z, dim=-1)
    y = target.unsqueeze(-1)
    p_y = p.gather(-1, y).squeeze(-1)
    p.scatter_(-1, y, 0.0)  # p now holds p_k for k ≠ y
    rest = p.sum(-1)
    sq_rest = torch.linalg.vecdot(p, p)
    el2n = torch.sqrt(sq_rest + rest * rest)
    nll = torch.where(rest < 0.5, -torch.log1p(-rest.clamp(max=0.5)), -torch.log(p_y))
    # p_y near or below the smallest normal float32 has lost its digits: exact log-softmax for those rows
    underflow = p_y < 1e-30
    if bool(underflow.any()):
        zu = z[underflow].double()
        nll[underflow] = (torch.logsumexp(zu, -1) - zu.gather(-1, y[underflow]).squeeze(-1)).to(nll.dtype)
    return el2n, nll


def chunked_token_scores(features: torch.Tensor, target: torch.Tensor,
                         project: Callable[[torch.Tensor], torch.Tensor],
                         chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EL2N and NLL for (N, D) decoder features: the output projection runs chunk by chunk."""
    el2n = torch.empty(target.shape[0], dtype=torch.float32, device=target.device)
    nll = torch.empty_like(el2n)
    for start in range(0, target.shape[0], chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        e, n = token_el2n_nll(project(features[sl]), target[sl])
        el2n[sl], nll[sl] = e, n
    return el2n, nll


def reference_el2n_nll(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 reference that materialises ``softmax − onehot`` (for tests and benchmarks only)."""
    z = logits.double()
    p = torch.softmax(z, dim=-1)
    onehot = torch.nn.functional.one_hot(target, z.shape[-1]).double()
    el2n = torch.linalg.vector_norm(p - onehot, dim=-1)
    nll = -torch.log_softmax(z, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return el2n, nll


def segment_mean(values: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Mean of ``values`` per segment id (e.g. token -> sentence in batch)."""
    total = torch.zeros(n_segments, dtype=torch.float64, device=values.device)
    total.index_add_(0, segment, values.double())
    count = torch.bincount(segment, minlength=n_segments).clamp(min=1)
    return total / count
