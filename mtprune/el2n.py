"""Scoring math on tensors, no I/O: per-token EL2N and NLL, and output-layer gradient scores per pair.

EL2N of a token is ``‖δ‖₂`` with ``δ = softmax(z) − onehot(y)``. Writing p = softmax(z), q = p with
its target entry set to 0 and r = 1 − p_y = Σ_{k≠y} p_k, δ = q − r·e_y and the squared norm is
q·q + r²: sums of non-negative terms, so no one-hot is built and nothing cancels (the textbook
``Σp² − 2p_y + 1`` loses every digit when p_y ≈ 1). NLL is −log1p(−r) for confident tokens
(p_y ≥ ½) and z_y − logsumexp(z) otherwise, both exact in float32 to a few ulps and chosen per token
with ``torch.where``: no branch, so no host–device sync, and no underflow when p_y is below the
float32 range (log-sum-exp is read off the largest probability, see ``_token_terms``).

The output layer's gradient for one pair is ``G = Σ_t δ_t h_tᵀ`` (V × D; the bias, when there is
one, is a last column of the weight with a constant feature 1). Three scores read it without ever
forming G per pair:

- ``grand`` = ‖G‖_F, from token Gram matrices: ‖G‖² = Σ_{t,s} (δ_t·δ_s)(h_t·h_s), with
  δ_t·δ_s = q_t·q_s − r_s q_t[y_s] − r_t q_s[y_t] + r_t r_s [y_t = y_s] (small terms only, so a
  confident pair keeps its digits); T² V work per pair of T tokens.
- ``tracin`` dot = ⟨G, G_dev⟩ = Σ_t (δ_tᵀ G_dev)·h_t: one more V × D product per token, the cost of
  the projection again. It is taken as q_t G_dev (then a D-long dot with h_t) rather than G_dev h_t
  (then a V-long dot with q_t): the same multiply-adds, but no second pass over V values per token.
- a sketch ``vec(R_Vᵀ G R_D) = Σ_t (δ_t R_V) ⊗ (h_t R_D)`` (k × k), Johnson–Lindenstrauss:
  ⟨sketch_i, sketch_j⟩ ≈ ⟨G_i, G_j⟩_F. Its q_t R_V shares tracin's product: q_t [G_dev | R_V] is one
  matrix multiply.

The vocabulary projection and every reduction run in float32 (float64 inputs stay float64) whatever
autocast the model body ran under. Work is split into chunks of whole sentences, so memory stays at
``chunk × vocabulary`` and no sentence's Gram matrix is cut.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

SKETCH_K = 16  # sketch = vec of a k × k matrix: 256 floats per pair
SKETCH_SEED = 20240601


def _token_terms(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, r, el2n, nll) for logits (..., V) and targets (...): q = softmax with the target zeroed."""
    q, r, el2n, nll, _ = _token_terms_correct(z, y)
    return q, r, el2n, nll


def _token_terms_correct(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``_token_terms`` and whether the target is among the largest logits (ties count as right).

    One fused softmax; log-sum-exp comes from the largest probability, which never underflows
    (p_max ≥ 1/V): logsumexp(z) = z_max − log p_max, so NLL = (z_max − z_y) − log p_max, two
    non-negative terms, for tokens with p_y < ½. The largest logit and the largest probability are
    taken as plain maxima (no argmax: a max with indices costs ~5× as much on CPU).
    """
    z = z if z.dtype in (torch.float32, torch.float64) else z.float()
    z_max = z.amax(-1)
    q = torch.softmax(z, dim=-1)
    p_max = q.amax(-1)
    yi = y.unsqueeze(-1)
    z_y = z.gather(-1, yi).squeeze(-1)
    q.scatter_(-1, yi, 0.0)
    r = q.sum(-1)
    el2n = torch.hypot(torch.linalg.vector_norm(q, dim=-1), r)
    nll = torch.where(r < 0.5, -torch.log1p(-r.clamp(max=0.5)), (z_max - z_y) - torch.log(p_max))
    return q, r, el2n, nll, z_y >= z_max


def token_el2n_nll(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """EL2N and NLL for N tokens: ``logits`` (N, V) in any float dtype, ``target`` (N,) int64.

    Computed in float32 (float64 inputs stay float64); returns two (N,) tensors.
    """
    _, _, el2n, nll = _token_terms(logits, target)
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


class OutputLayer:
    """The vocabulary projection as the scores see it, plus what tracin and the sketch need.

    ``weight`` (V, D) and ``bias`` (V,) or None come from the model (``decoder.output_projection``);
    they are kept in float32 (float64 stays float64) as one (V, D[+1]) matrix. ``dev_grad`` is the
    summed dev-set gradient in the same layout (``output_gradient``); ``sketch`` the pair
    (R_V (V, k), R_D (D[+1], k)), already divided by √k (``sketch_projections``).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 dev_grad: torch.Tensor | None = None,
                 sketch: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        w = weight.detach()
        w = w if w.dtype in (torch.float32, torch.float64) else w.float()
        self.has_bias = bias is not None
        if bias is not None:
            w = torch.cat([w, bias.detach().to(w.dtype).unsqueeze(1)], 1)
        self.weight = w
        self.vocab = w.shape[0]
        self.dev_grad = None if dev_grad is None else dev_grad.to(w.dtype).contiguous()
        self.sketch = None if sketch is None else (sketch[0].to(w.dtype), sketch[1].to(w.dtype))
        # what q (softmax with the target zeroed) is multiplied by for tracin and the sketch, side by side
        parts = [x for x in (self.dev_grad, None if self.sketch is None else self.sketch[0]) if x is not None]
        self.q_right = torch.cat(parts, 1).contiguous() if parts else None

    @classmethod
    def of(cls, projection: torch.nn.Module, **kw: object) -> OutputLayer:
        return cls(projection.weight, getattr(projection, "bias", None), **kw)  # type: ignore[arg-type]

    def features(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Decoder states (S, T, D) -> (S, T, D[+1]) in the layer's dtype, zero at padding."""
        m = mask.to(self.weight.dtype).unsqueeze(-1)
        h = h.to(self.weight.dtype) * m
        return torch.cat([h, m], -1) if self.has_bias else h


def sketch_projections(vocab: int, dim: int, k: int = SKETCH_K, seed: int = SKETCH_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded Gaussian R_V (V, k) and R_D (D, k), each divided by √k (float32, CPU)."""
    g = torch.Generator().manual_seed(seed)
    r_v = torch.randn(vocab, k, generator=g) / math.sqrt(k)
    r_d = torch.randn(dim, k, generator=g) / math.sqrt(k)
    return r_v, r_d


# logits (chunk tokens × vocabulary) held at once with ``score.chunk_tokens: auto``. On CPU 2M, 8 MB a
# tensor, which logits and probabilities share with a 32 MB L3 cache: scripts/bench_score.py (1+1 layers,
# dim 32, one thread, 2,000 sentences) measured 2^18, 2^19, 2^20 and 2^21 logits at vocabularies 1k, 8k
# and 32k; 2^21 was the fastest all-scores pass at each (1k: 82.8k target tokens/s against 68.7k with the
# old fixed 128 tokens; 8k: 18.2k against 17.4k), and 4M logits at 8k fell to 14.1k. On a GPU 128M.
CHUNK_LOGITS = {"cpu": 1 << 21, "cuda": 1 << 27}


def chunk_size(setting: int | str, vocab: int, device: str) -> int:
    """Target tokens per chunk of the vocabulary projection: ``score.chunk_tokens``, or with ``auto``
    as many as keep ``CHUNK_LOGITS[device]`` logits at once (at least one token)."""
    if setting != "auto":
        return int(setting)
    return max(1, CHUNK_LOGITS.get(device, CHUNK_LOGITS["cpu"]) // max(vocab, 1))


def _rows_per_chunk(length: int, chunk_tokens: int) -> int:
    return max(1, chunk_tokens // max(length, 1))


def pair_scores(feats: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, layer: OutputLayer,
                chunk_tokens: int, gradient_scores: bool = False) -> dict[str, torch.Tensor]:
    """Per-pair scores for a padded batch: ``feats`` (S, T, D) decoder states, ``target``/``mask`` (S, T).

    Always: ``el2n`` / ``nll`` (token means), ``el2n_max``, ``el2n_eos`` (the last real token), the
    per-token ``tok_el2n`` / ``tok_nll`` (S, T; 0 at padding) and ``tok_correct`` (S, T; the target
    among the largest logits, False at padding). With ``gradient_scores``: ``grand``,
    and ``tracin_dot`` / ``sketch`` (S, k²) when the layer carries ``dev_grad`` / ``sketch``.
    Chunks are whole sentences (rows), about ``chunk_tokens`` tokens each. Pads must be right-padded.
    """
    s_rows, length = target.shape
    dt = layer.weight.dtype
    lengths = mask.sum(1)
    tok_e = torch.zeros(s_rows, length, dtype=dt, device=target.device)
    tok_n = torch.zeros_like(tok_e)
    tok_c = torch.zeros(s_rows, length, dtype=torch.bool, device=target.device)
    out: dict[str, torch.Tensor] = {}
    if gradient_scores:
        out["grand"] = torch.empty(s_rows, dtype=torch.float64, device=target.device)
        if layer.dev_grad is not None:
            out["tracin_dot"] = torch.empty(s_rows, dtype=torch.float64, device=target.device)
        if layer.sketch is not None:
            size = layer.sketch[0].shape[1] * layer.sketch[1].shape[1]
            out["sketch"] = torch.empty(s_rows, size, dtype=dt, device=target.device)
    with torch.autocast(device_type=target.device.type, enabled=False):
        step = _rows_per_chunk(length, chunk_tokens)
        for start in range(0, s_rows, step):
            sl = slice(start, start + step)
            m, y = mask[sl], target[sl]
            h = layer.features(feats[sl], m)
            z = h @ layer.weight.T
            q, r, e, n, correct = _token_terms_correct(z, y)
            tok_c[sl] = correct & m  # the target among the largest logits: what forgetting events count
            del z
            fm = m.to(dt)
            tok_e[sl], tok_n[sl] = e * fm, n * fm
            if not gradient_scores:
                continue
            r = r * fm  # δ_t = q_t − r_t e_{y_t}; padding rows have h = 0, so they drop out of every term below
            bq = q.gather(-1, y.unsqueeze(1).expand(-1, y.shape[1], -1))  # bq[s, t, u] = q_t[y_u]
            dd = (q @ q.transpose(1, 2) - r.unsqueeze(1) * bq - r.unsqueeze(2) * bq.transpose(1, 2)
                  + (r.unsqueeze(2) * r.unsqueeze(1)) * (y.unsqueeze(2) == y.unsqueeze(1)))
            hh = h @ h.transpose(1, 2)
            out["grand"][sl] = (dd.double() * hh.double()).sum((1, 2)).clamp(min=0).sqrt()
            if layer.q_right is None:
                continue
            qr = (q.flatten(0, 1) @ layer.q_right).view(*y.shape, -1)  # tracin's one extra V × D product (+ sketch's V × k)
            split = 0
            if layer.dev_grad is not None:
                split = layer.dev_grad.shape[1]
                d = ((qr[..., :split] - r.unsqueeze(-1) * layer.dev_grad[y]) * h).sum(-1)  # δ_tᵀ G_dev h_t
                out["tracin_dot"][sl] = (d.double() * fm.double()).sum(1)
            if layer.sketch is not None:
                r_v, r_d = layer.sketch
                a = qr[..., split:] - r.unsqueeze(-1) * r_v[y]
                out["sketch"][sl] = torch.einsum("stk,stl->skl", a, h @ r_d).flatten(1)
    n_tok = lengths.clamp(min=1).to(torch.float64)
    out["el2n"] = tok_e.double().sum(1) / n_tok
    out["nll"] = tok_n.double().sum(1) / n_tok
    out["el2n_max"] = tok_e.amax(1).double()
    out["el2n_eos"] = tok_e.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1).double()
    out["tok_el2n"], out["tok_nll"], out["tok_correct"] = tok_e, tok_n, tok_c
    return out


def forgetting(correct: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Per-pair forgetting (float64, (S,)) from one proxy run's checkpoints in update order.

    ``correct``: for each checkpoint a bool (S, T) tensor, True where the target token was among the
    model's most likely tokens; ``mask`` (S, T): the real tokens. A token's forgetting events are the
    consecutive checkpoints where it goes from right to wrong; a token no checkpoint gets right counts
    ``len(correct)`` events, more than any learnt token can have, so that, as in Toneva et al. (2019),
    never-learnt examples rank above every forgotten one. The pair's score: the mean over its real tokens.
    """
    events = torch.zeros(mask.shape, dtype=torch.float64, device=mask.device)
    for before, after in zip(correct[:-1], correct[1:], strict=True):
        events += (before & ~after).double()
    never = mask & ~torch.stack(correct).any(0)
    events = torch.where(never, float(len(correct)), events) * mask.double()
    return events.sum(1) / mask.sum(1).clamp(min=1).double()


def output_gradient(feats: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, layer: OutputLayer,
                    chunk_tokens: int) -> torch.Tensor:
    """Σ over the batch's real tokens of δ_t h_tᵀ: the summed cross-entropy's gradient w.r.t. the
    output layer, (V, D[+1]) in float64 (the bias gradient Σ δ_t as the last column when there is one)."""
    s_rows, length = target.shape
    grad = torch.zeros(layer.weight.shape, dtype=torch.float64, device=target.device)
    with torch.autocast(device_type=target.device.type, enabled=False):
        step = _rows_per_chunk(length, chunk_tokens)
        for start in range(0, s_rows, step):
            sl = slice(start, start + step)
            m, y = mask[sl], target[sl]
            h = layer.features(feats[sl], m).flatten(0, 1)
            q, r, _, _ = _token_terms(h @ layer.weight.T, y.flatten())
            q.scatter_(-1, y.flatten().unsqueeze(-1), -r.unsqueeze(-1))  # q becomes δ (padding rows have h = 0)
            grad += (q.T @ h).double()
    return grad


def reference_el2n_nll(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 reference that materialises ``softmax − onehot`` (for tests and benchmarks only)."""
    z = logits.double()
    p = torch.softmax(z, dim=-1)
    onehot = torch.nn.functional.one_hot(target, z.shape[-1]).double()
    el2n = torch.linalg.vector_norm(p - onehot, dim=-1)
    nll = -torch.log_softmax(z, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return el2n, nll


def reference_output_grad(h: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float64 autograd gradient of Σ_t CE(W h_t + b, y_t) w.r.t. W and b (tests and benchmarks only)."""
    w = weight.detach().double().clone().requires_grad_(True)
    b = None if bias is None else bias.detach().double().clone().requires_grad_(True)
    with torch.enable_grad(), torch.inference_mode(False):
        z = torch.nn.functional.linear(h.detach().double().clone(), w, b)
        loss = torch.nn.functional.cross_entropy(z, target.clone(), reduction="sum")
        grads = torch.autograd.grad(loss, [w] + ([b] if b is not None else []))
    return grads[0], (grads[1] if b is not None else None)


def segment_mean(values: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Mean of ``values`` per segment id (e.g. token -> sentence in batch)."""
    total = torch.zeros(n_segments, dtype=torch.float64, device=values.device)
    total.index_add_(0, segment, values.double())
    count = torch.bincount(segment, minlength=n_segments).clamp(min=1)
    return total / count
