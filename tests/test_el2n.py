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


def test_bf16_autocast_on_a_real_checkpoint_stays_within_the_documented_tolerance(tiny_run) -> None:
    """score.py on cuda: the model under bf16 autocast, the reduction in float32 (here CPU autocast)."""
    import numpy as np

    from mtprune.fairseq_backend import load_model, load_train_pairs
    from mtprune.layout import RunLayout
    from mtprune.scoring.forward import collate, score_batch

    L = RunLayout(tiny_run)
    ckpt = L.proxy_checkpoint(1, 20)
    model = load_model(ckpt, L.data_bin, "cpu")[0]
    model64 = load_model(ckpt, L.data_bin, "cpu")[0].double()
    src, tgt, d = load_train_pairs(L.data_bin)
    n = 60
    batch = collate(src, tgt, np.arange(n), d.pad(), d.eos())
    mask = batch["target"].ne(d.pad())
    rows = mask.nonzero()[:, 0]
    with torch.inference_mode():
        out = score_batch(model, batch, d.pad(), 13, "cpu", torch.bfloat16)
        pair_e, pair_n, tok_e, tok_n = out["el2n"], out["nll"], out["tok_el2n"], out["tok_nll"]
        fp32_e = score_batch(model, batch, d.pad(), 13, "cpu", None)["tok_el2n"]
        logits, _ = model64(batch["src_tokens"], batch["src_lengths"], batch["prev"])
    assert logits.dtype == torch.float64
    ref_e, ref_n = reference_el2n_nll(logits[mask], batch["target"][mask])
    assert (tok_e.double() - fp32_e.double()).abs().max() > 1e-6  # autocast did run the model in bf16
    # the bf16 body with a float32 projection (score.py documents 2.7e-5 and 4.7e-4 per pair on 1,200 pairs)
    assert (tok_e.double() - ref_e).abs().max() <= 1e-3
    assert ((tok_n.double() - ref_n).abs() / ref_n).max() <= 1e-2
    assert (pair_e - segment_mean(ref_e, rows, n)).abs().max() <= 1e-4
    ref_pair_n = segment_mean(ref_n, rows, n)
    assert ((pair_n - ref_pair_n).abs() / ref_pair_n).max() <= 1e-3
    from mtprune.scoring.stats import spearman

    assert spearman(pair_e.numpy(), segment_mean(ref_e, rows, n).numpy()) >= 0.999
    assert spearman(pair_n.numpy(), ref_pair_n.numpy()) >= 0.999


# ---- output-layer gradient scores (el2n.pair_scores) against float64 autograd ----------------------------

def _padded(seed: int, rows: int = 6, length: int = 9, dim: int = 8, vocab: int = 40, bias: bool = False):
    from mtprune.el2n import OutputLayer

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(vocab, dim, generator=g)
    b = torch.randn(vocab, generator=g) if bias else None
    h = torch.randn(rows, length, dim, generator=g) * 2
    y = torch.randint(0, vocab, (rows, length), generator=g)
    lengths = torch.tensor([length, 1, 4, length - 1, 2, 7][:rows])
    mask = torch.arange(length)[None] < lengths[:, None]
    y[1, 0] = (h[1, 0] @ w.T).argmax()  # a one-token pair the layer is sure of: tiny gradient, digits must stay
    h[1, 0] *= 20
    return h, y, mask, w, b, OutputLayer(w, b)


def _ref_grad(h, y, w, b):
    from mtprune.el2n import reference_output_grad

    gw, gb = reference_output_grad(h, y, w, b)
    return gw if gb is None else torch.cat([gw, gb[:, None]], 1)


def test_grand_and_tracin_equal_autograd_on_the_output_layer() -> None:
    from mtprune.el2n import OutputLayer, output_gradient, pair_scores

    for bias in (False, True):
        h, y, mask, w, b, plain = _padded(0, bias=bias)
        hd, yd, md, *_ = _padded(1, bias=bias)
        hd, yd = hd * 0.5, yd  # a "dev set": other states and targets through the same layer
        dev = output_gradient(hd, yd, md, plain, chunk_tokens=10)  # 10 tokens: one row per chunk
        dev_ref = _ref_grad(hd[md], yd[md], w, b)
        torch.testing.assert_close(dev, dev_ref, rtol=1e-5, atol=1e-5)
        layer = OutputLayer(w, b, dev_grad=dev.float())
        for chunk in (1, 20, 1000):  # a Gram matrix never spans two sentences, whatever the chunk
            out = pair_scores(h, y, mask, layer, chunk, gradient_scores=True)
            for i in range(h.shape[0]):
                g = _ref_grad(h[i][mask[i]], y[i][mask[i]], w, b)
                assert abs(float(out["grand"][i]) - float(g.norm())) <= 1e-5 * float(g.norm()) + 1e-9, (bias, chunk, i)
                dot = float((g * dev_ref).sum())
                assert abs(float(out["tracin_dot"][i]) - dot) <= 1e-5 * float(g.norm() * dev_ref.norm()), (bias, i)
        assert float(out["grand"][1]) < 1e-3  # the confident one-token pair


def test_el2n_max_and_eos_are_the_reference_token_el2n() -> None:
    from mtprune.el2n import pair_scores

    h, y, mask, w, b, layer = _padded(2, bias=True)
    out = pair_scores(h, y, mask, layer, chunk_tokens=13)
    for i in range(h.shape[0]):
        e, n = reference_el2n_nll(h[i][mask[i]].double() @ w.double().T + b.double(), y[i][mask[i]])
        # float32 logits of size ~100 (the confident pair) carry ~1e-5 relative error into its small EL2N
        torch.testing.assert_close(out["el2n_max"][i], e.max(), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(out["el2n_eos"][i], e[-1], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(out["el2n"][i], e.mean(), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(out["nll"][i], n.mean(), rtol=1e-4, atol=1e-7)
    assert float(out["el2n_max"][0]) > float(out["el2n"][0]) > 0
    assert "grand" not in out  # the gradient scores only when asked for


def test_sketch_is_the_gradient_itself_with_identity_projections_and_keeps_inner_products() -> None:
    from mtprune.el2n import OutputLayer, pair_scores, sketch_projections

    h, y, mask, w, b, _ = _padded(3, vocab=12, dim=5)
    exact = OutputLayer(w, b, sketch=(torch.eye(12), torch.eye(5)))  # R_V = I, R_D = I: sketch = vec(G)
    out = pair_scores(h, y, mask, exact, 7, gradient_scores=True)
    grads = [_ref_grad(h[i][mask[i]], y[i][mask[i]], w, b) for i in range(h.shape[0])]
    for i, g in enumerate(grads):
        torch.testing.assert_close(out["sketch"][i].double(), g.flatten(), rtol=1e-5, atol=1e-6)
    # the seeded Gaussian sketch (k = 16): inner products of distinct pairs within JL tolerance
    h, y, mask, w, b, _ = _padded(4, vocab=300, dim=32)
    layer = OutputLayer(w, b, sketch=sketch_projections(300, 32))
    out = pair_scores(h, y, mask, layer, 64, gradient_scores=True)
    grads = [_ref_grad(h[i][mask[i]], y[i][mask[i]], w, b) for i in range(h.shape[0])]
    for i in (0, 2, 3, 5):
        for j in (0, 2, 3, 5):
            approx = float(out["sketch"][i].double() @ out["sketch"][j].double())
            true = float((grads[i] * grads[j]).sum())
            assert abs(approx - true) <= 0.35 * float(grads[i].norm() * grads[j].norm()), (i, j, approx, true)


def test_projection_runs_in_float32_under_autocast() -> None:
    from mtprune.el2n import OutputLayer, pair_scores

    h, y, mask, w, b, layer = _padded(5, vocab=300, dim=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pair_scores(h, y, mask, layer, 16)
    ref = pair_scores(h, y, mask, layer, 16)
    assert out["tok_el2n"].dtype == torch.float32
    torch.testing.assert_close(out["tok_el2n"], ref["tok_el2n"], rtol=0, atol=0)
    bf16 = pair_scores(h.bfloat16().float(), y, mask, OutputLayer(w.bfloat16().float()), 16)
    assert (bf16["el2n"] - ref["el2n"]).abs().max() > 1e-4  # what a bf16 projection would have cost


def test_a_batch_that_overflows_fp16_is_scored_again_in_float32(tiny_run) -> None:
    """score.precision fp16 (auto on a GPU): activations beyond fp16's range would give NaN scores; that batch
    is run again in float32 (CPU autocast stands in for cuda's)."""
    import numpy as np

    import mtprune.scoring.forward as score
    from mtprune.fairseq_backend import load_model, load_train_pairs
    from mtprune.layout import RunLayout

    L = RunLayout(tiny_run)
    model = load_model(L.proxy_checkpoint(1, 20), L.data_bin, "cpu")[0]
    src, tgt, d = load_train_pairs(L.data_bin)
    batch = score.collate(src, tgt, np.arange(20), d.pad(), d.eos())
    with torch.inference_mode():
        fc1 = model.decoder.layers[-1].fc1
        fc1.weight.mul_(1e6)  # the last decoder layer's FFN now far exceeds 65504 in fp16, not float32's range
        with torch.autocast("cpu", dtype=torch.float16):  # what the check guards against
            enc = model.encoder(batch["src_tokens"], src_lengths=batch["src_lengths"])
            raw, _ = model.decoder(batch["prev"], encoder_out=enc, features_only=True)
        assert not torch.isfinite(raw).all()
        before = score._fp16_overflows
        out = score.score_batch(model, batch, d.pad(), 13, "cpu", torch.float16)
        ref = score.score_batch(model, batch, d.pad(), 13, "cpu", None)
    assert score._fp16_overflows == before + 1
    assert torch.isfinite(out["el2n"]).all() and torch.isfinite(out["nll"]).all()
    torch.testing.assert_close(out["el2n"], ref["el2n"], rtol=0, atol=0)
    torch.testing.assert_close(out["nll"], ref["nll"], rtol=0, atol=0)


def test_tok_correct_is_the_target_at_the_argmax_of_the_reference_logits() -> None:
    from mtprune.el2n import pair_scores

    h, y, mask, w, b, layer = _padded(5, bias=True)
    z = h @ w.T + b
    y = torch.where(torch.arange(y.shape[1]) % 2 == 0, z.argmax(-1), y)  # every other token predicted
    out = pair_scores(h, y, mask, layer, chunk_tokens=7)
    want = (z.argmax(-1) == y) & mask
    assert torch.equal(out["tok_correct"], want)
    assert bool(want.any()) and bool((mask & ~want).any())  # both kinds present
    assert not bool(out["tok_correct"][~mask].any())  # padding is never "right"


def test_forgetting_counts_right_to_wrong_and_ranks_never_learnt_highest() -> None:
    from mtprune.el2n import forgetting

    t, f = True, False
    # 3 pairs × 3 token slots, 4 checkpoints; row 2's last slot is padding
    seq = {  # per (pair, token): right/wrong at checkpoints 1..4
        (0, 0): (t, t, t, t), (0, 1): (f, t, t, t), (0, 2): (t, t, t, t),  # learnt, never forgotten: 0
        (1, 0): (t, f, t, f), (1, 1): (f, t, f, t), (1, 2): (t, t, t, f),  # 2, 1, 1 events
        (2, 0): (f, f, f, f), (2, 1): (t, f, f, f), (2, 2): (t, f, t, f),  # never (4), 1, padding
    }
    correct = [torch.zeros(3, 3, dtype=torch.bool) for _ in range(4)]
    for (i, j), marks in seq.items():
        for k, m in enumerate(marks):
            correct[k][i, j] = m
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[2, 2] = False
    got = forgetting(correct, mask)
    torch.testing.assert_close(got, torch.tensor([0.0, 4 / 3, 5 / 2], dtype=torch.float64))
