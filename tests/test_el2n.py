import torch

from mtprune.el2n import chunked_token_scores, reference_el2n_nll, segment_mean, token_el2n_nll


def _logits(n: int, v: int, scale: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale


def test_matches_float64_onehot_reference_to_1e5_relative() -> None:
    for scale in (0.1, 1.0, 5.0, 20.0):  # from flat to very confident distributions
        z = _logits(300, 1000, scale)
        y = torch.randint(0, 1000, (300,), generator=torch.Generator().manual_seed(1))
        y[:100] = z[:100].argmax(-1)  # confident and correct: EL2N near 0, where cancellation would bite
        e, n = token_el2n_nll(z, y)
        re, rn = reference_el2n_nll(z, y)
        # atol 1e-10: below that, squares of float32 probabilities fall into the denormal range
        torch.testing.assert_close(e.double(), re, rtol=1e-5, atol=1e-10)
        torch.testing.assert_close(n.double(), rn, rtol=1e-5, atol=1e-10)


def test_extreme_logits_stay_finite_and_exact() -> None:
    z = torch.zeros(3, 50)
    z[0, 7] = 200.0   # p_y == 1 to float precision: EL2N = 0, NLL = 0
    z[1, 3] = 200.0   # target 7 has p below float range: NLL must still be exact (~200)
    y = torch.tensor([7, 7, 7])
    e, n = token_el2n_nll(z, y)
    re, rn = reference_el2n_nll(z, y)
    assert torch.isfinite(e).all() and torch.isfinite(n).all()
    torch.testing.assert_close(n.double(), rn, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(e.double(), re, rtol=1e-5, atol=1e-6)
    assert abs(float(e[1]) - 2 ** 0.5) < 1e-6  # a confident wrong token is maximally far: sqrt(2)


def test_half_precision_logits_are_reduced_in_float32() -> None:
    z = _logits(64, 500, 3.0)
    y = torch.randint(0, 500, (64,))
    e, _ = token_el2n_nll(z.bfloat16(), y)
    assert e.dtype == torch.float32
    re, _ = reference_el2n_nll(z.bfloat16().float(), y)
    torch.testing.assert_close(e.double(), re, rtol=1e-5, atol=0)


def test_chunking_does_not_change_results() -> None:
    feats = _logits(257, 16, 1.0, seed=3)
    proj = torch.nn.Linear(16, 300, bias=False)
    y = torch.randint(0, 300, (257,))
    with torch.no_grad():
        whole = chunked_token_scores(feats, y, proj, chunk_tokens=10_000)
        chunked = chunked_token_scores(feats, y, proj, chunk_tokens=7)
    torch.testing.assert_close(whole[0], chunked[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(whole[1], chunked[1], rtol=1e-6, atol=1e-7)


def test_segment_mean() -> None:
    v = torch.tensor([1.0, 3.0, 10.0, 2.0])
    seg = torch.tensor([0, 0, 2, 2])
    assert segment_mean(v, seg, 3).tolist() == [2.0, 0.0, 6.0]
