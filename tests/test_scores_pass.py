"""The scores computed beside EL2N in the scoring pass (el2n_max, el2n_eos, grand, tracin, proto, the
gradient sketch) against float64 brute force on a tiny fairseq model with random weights, and the
columns they become in scores.parquet."""

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY, cli
from mtprune.config import load_config
from mtprune.el2n import reference_el2n_nll, reference_output_grad, sketch_projections
from mtprune.layout import RunLayout
from mtprune.scoring.forward import (
    checkpoints,
    dev_gradient,
    output_layer,
    proxy_lr,
    score_dataset,
)
from mtprune.scoring.proto import proto_distances

NEW = ("el2n_max", "el2n_eos", "grand", "tracin", "proto")


def _model(vocab_dict, seed: int):
    from fairseq.models.transformer import TransformerModel, base_architecture

    args = argparse.Namespace(encoder_layers=1, decoder_layers=1, encoder_embed_dim=16, decoder_embed_dim=16,
                              encoder_ffn_embed_dim=32, decoder_ffn_embed_dim=32, encoder_attention_heads=2,
                              decoder_attention_heads=2, share_all_embeddings=True, dropout=0.0,
                              max_source_positions=256, max_target_positions=256)
    base_architecture(args)

    class Task:
        source_dictionary = target_dictionary = vocab_dict

    torch.manual_seed(seed)
    model = TransformerModel.build_model(args, Task()).eval()
    with torch.no_grad():  # a sharper output distribution than the init's near-uniform one
        model.decoder.output_projection.weight.mul_(8.0)
    return model


def _corpus(folder: Path, d, n: int, seed: int):
    from fairseq.data import data_utils, indexed_dataset

    rng = np.random.default_rng(seed)
    out = []
    for side in ("src", "tgt"):
        prefix = folder / f"{seed}.{side}"
        builder = indexed_dataset.make_builder(f"{prefix}.bin", impl="mmap", vocab_size=len(d))
        for _ in range(n):
            toks = rng.integers(d.nspecial, len(d), size=int(rng.integers(1, 12)))
            builder.add_item(torch.tensor(np.append(toks, d.eos()), dtype=torch.int32))
        builder.finalize(f"{prefix}.idx")
        out.append(data_utils.load_indexed_dataset(str(prefix), d, dataset_impl="mmap"))
    return out


@pytest.fixture(scope="module")
def random_models(tmp_path_factory: pytest.TempPathFactory):
    from fairseq.data import Dictionary

    from mtprune.fairseq_backend import quiet_fairseq

    quiet_fairseq()
    d = Dictionary()
    for i in range(50):
        d.add_symbol(f"w{i}")
    folder = tmp_path_factory.mktemp("corpus")
    train, valid = _corpus(folder, d, 30, 0), _corpus(folder, d, 9, 1)
    return [_model(d, 1), _model(d, 2)], d, train, valid


def _one_pair(model, src_ds, tgt_ds, d, i: int):
    """Float64 decoder states, encoder states and target of pair i, alone (no padding)."""
    s, t = src_ds[i].long(), tgt_ds[i].long()
    prev = torch.cat([torch.tensor([d.eos()]), t[:-1]])
    m64 = model.double()  # float32 -> float64 -> float32 round-trips the weights exactly
    try:
        with torch.no_grad():
            enc = m64.encoder(s[None], src_lengths=torch.tensor([len(s)]))
            feats, _ = m64.decoder(prev[None], encoder_out=enc, features_only=True)
        return feats[0], enc["encoder_out"][0][:, 0], t
    finally:
        model.float()


def test_the_pass_equals_float64_brute_force_per_pair(random_models) -> None:
    models, d, (src, tgt), (vsrc, vtgt) = random_models
    w64 = [m.decoder.output_projection.weight.detach().double() for m in models]
    with torch.inference_mode():
        devs = [dev_gradient(m, vsrc, vtgt, d, batch_tokens=60, chunk_tokens=9, device="cpu", dtype=None)
                for m in models]
    dev_ref = []
    for m, w in zip(models, w64, strict=True):
        g = 0
        for j in range(len(vtgt)):
            h, _, t = _one_pair(m, vsrc, vtgt, d, j)
            g = g + reference_output_grad(h, t, w)[0]
        dev_ref.append(g)
    for got, ref in zip(devs, dev_ref, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)

    r_v, r_d = sketch_projections(len(d), 16)
    layers = [output_layer(m, dev_grad=g, sketch=(r_v, r_d)) for m, g in zip(models, devs, strict=True)]
    idx = np.arange(len(tgt))
    sketch = np.zeros((len(idx), 256), dtype=np.float32)
    pooled = np.zeros((len(idx), 2, 16), dtype=np.float32)
    with torch.inference_mode():  # several batches, chunks of 7 tokens: most rows alone in a chunk
        res = score_dataset(models, src, tgt, d, idx, batch_tokens=80, chunk_tokens=7, device="cpu", dtype=None,
                            layers=layers, full=True, sketch_out=sketch, pooled_out=pooled)
    for i in idx:
        sk_ref = 0
        for k, (m, w) in enumerate(zip(models, w64, strict=True)):
            h, enc, t = _one_pair(m, src, tgt, d, i)
            e, n = reference_el2n_nll(h @ w.T, t)
            g = reference_output_grad(h, t, w)[0]
            tol = lambda ref: 2e-5 * abs(ref) + 1e-6  # noqa: E731
            assert abs(res["el2n"][i, k] - float(e.mean())) <= tol(float(e.mean()))
            assert abs(res["nll"][i, k] - float(n.mean())) <= tol(float(n.mean()))
            assert abs(res["el2n_max"][i, k] - float(e.max())) <= tol(float(e.max()))
            assert abs(res["el2n_eos"][i, k] - float(e[-1])) <= tol(float(e[-1]))
            assert abs(res["grand"][i, k] - float(g.norm())) <= 1e-4 * float(g.norm()), (i, k)
            dot = float((g * dev_ref[k]).sum())
            assert abs(res["tracin_dot"][i, k] - dot) <= 1e-4 * float(g.norm() * dev_ref[k].norm()), (i, k)
            np.testing.assert_allclose(pooled[i, k], enc.mean(0).numpy(), rtol=1e-4, atol=1e-5)
            sk_ref = sk_ref + (r_v.double().T @ g @ r_d.double()).flatten() / len(models)
        np.testing.assert_allclose(sketch[i], sk_ref.numpy(), rtol=1e-4, atol=1e-4 * float(sk_ref.abs().max()))
    assert len(set(np.round(res["el2n_eos"][:, 0], 6))) > 1 and (res["el2n_max"] >= res["el2n"]).all()


def test_the_el2n_only_pass_skips_the_gradient_scores(random_models) -> None:
    models, d, (src, tgt), _ = random_models
    with torch.inference_mode():
        res = score_dataset(models, src, tgt, d, np.arange(5), 80, 7, "cpu", None)
    assert {"el2n", "nll", "el2n_max", "el2n_eos"} <= set(res) and "grand" not in res


def test_proto_is_the_cosine_distance_to_the_nearest_kmeans_centroid() -> None:
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 8))
    x = np.concatenate([c + 0.05 * rng.normal(size=(40, 8)) for c in centers] + [rng.normal(size=(1, 8))])
    pooled = np.stack([x, x[:, ::-1]], 1).astype(np.float32)  # two "checkpoints"
    groups = np.array(["a"] * 80 + ["b"] * 80 + ["a"])  # two clusters per group, one odd pair in a
    got = proto_distances(pooled, groups, clusters=2)
    for g in ("a", "b"):
        rows = np.flatnonzero(groups == g)
        for k in range(2):
            xn = pooled[rows, k] / np.linalg.norm(pooled[rows, k], axis=1, keepdims=True)
            c = KMeans(2, random_state=0, n_init=1).fit(xn).cluster_centers_
            c = c / np.linalg.norm(c, axis=1, keepdims=True)
            np.testing.assert_allclose(got[rows, k], 1 - (xn @ c.T).max(1), rtol=1e-5, atol=1e-6)
    assert int(np.argmax(got[:, 0])) == int(np.argmax(got[:, 1])) == 160  # the pair far from every cluster


def test_pooled_states_of_a_wide_model_are_projected_into_float16(random_models) -> None:
    """A model wider than POOLED_DIMS keeps its pooled states as x @ B_k in float16 (what `proto` clusters),
    B_k from the valid split's states of checkpoint k; a narrower one keeps them whole."""
    from mtprune.scoring.stored import POOLED_DIMS, pooled_basis

    assert pooled_basis(torch.randn(10, POOLED_DIMS)) is None
    models, d, (src, tgt), (vsrc, vtgt) = random_models
    states: list = []
    with torch.inference_mode():
        dev_gradient(models[0], vsrc, vtgt, d, batch_tokens=60, chunk_tokens=9, device="cpu", dtype=None,
                     pooled=states)
    assert sum(len(x) for x in states) == len(vtgt) and states[0].shape[1] == 16
    idx = np.arange(len(tgt))
    full = np.zeros((len(idx), 2, 16), dtype=np.float32)
    small = np.zeros((len(idx), 2, 3), dtype=np.float16)
    proj = [torch.randn(16, 3, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    with torch.inference_mode():
        score_dataset(models, src, tgt, d, idx, 80, 7, "cpu", None, full=True, pooled_out=full)
        score_dataset(models, src, tgt, d, idx, 80, 7, "cpu", None, full=True, pooled_out=small, pooled_proj=proj)
    for k in range(2):
        np.testing.assert_allclose(small[:, k].astype(np.float32), full[:, k] @ proj[k].numpy(), rtol=2e-3, atol=2e-3)
    # a 512-dim model's states near a 40-dim subspace: the basis spans it, cosines between pairs are kept
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(40, 512, generator=gen)
    x = torch.randn(3000, 40, generator=gen) @ mix + 0.01 * torch.randn(3000, 512, generator=gen)
    basis = pooled_basis(x[:500])  # "the valid split"
    assert basis.shape == (512, POOLED_DIMS)
    torch.testing.assert_close(basis.T @ basis, torch.eye(POOLED_DIMS), atol=1e-4, rtol=0)
    y = (x @ basis).half().float()
    cos = lambda a: torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(a, dim=1).T  # noqa: E731
    assert float((cos(x) - cos(y)).abs().max()) < 0.01
    assert pooled_basis(x[:10]).shape == (512, POOLED_DIMS)  # fewer valid pairs than dimensions: zero columns


def test_lr_is_what_fairseq_held_at_each_checkpoint(tiny_run: Path) -> None:
    cfg = load_config(TINY, [], run_dir=str(tiny_run))
    for c in checkpoints(cfg, RunLayout(tiny_run)):
        state = torch.load(c.path, map_location="cpu", weights_only=False)
        held = state["last_optimizer_state"]["param_groups"][0]["lr"]
        assert proxy_lr(cfg.proxy.lr, cfg.proxy.warmup_updates, c.updates) == pytest.approx(held, rel=1e-9), c.tag
    assert proxy_lr(0.002, 5, 2) == pytest.approx(1e-7 + 2 * (0.002 - 1e-7) / 5)  # inside warm-up


def test_score_table_sketch_and_diagnostics_carry_the_new_scores(tiny_run: Path) -> None:
    L = RunLayout(tiny_run)
    df = pd.read_parquet(L.scores)
    tags = [c.tag for c in checkpoints(load_config(TINY, [], run_dir=str(tiny_run)), L)]
    for name in NEW:
        per = df[[f"{name}@{t}" for t in tags]].to_numpy()
        assert np.isfinite(per).all(), name
        if name == "tracin":  # summed over a seed's checkpoints, averaged over the 2 seeds
            np.testing.assert_allclose(df[name], per.sum(1) / 2, rtol=1e-12)
        else:
            np.testing.assert_allclose(df[name], per.mean(1), rtol=1e-12)
    assert (df["el2n_max"] >= df["el2n"]).all() and (df["grand"] > 0).all() and (df["proto"] >= 0).all()
    sketch = np.load(L.grad_sketch)
    assert sketch.shape == (len(df), 256) and sketch.dtype == np.float16 and np.abs(sketch).sum(1).min() > 0
    manifest = json.loads(L.manifest("score").read_text())
    assert "grad_sketch.npy" in manifest["outputs"]
    for name in NEW:
        assert "spearman_vs_length" in manifest["stats"]["per_score"][name], name


def test_prune_takes_every_new_column(tiny_copy: Path) -> None:
    from mtprune.stages.prune import drop_mask

    df = pd.read_parquet(RunLayout(tiny_copy).scores)
    n = int(0.2 * len(df))
    for name in NEW:
        for side in ("high", "low"):
            load_config(TINY, [f"prune.strategies=[{name}-{side}]"], run_dir=str(tiny_copy))  # a valid strategy
            dropped = df[drop_mask(df, f"{name}-{side}", 0.2, "global", 1)][name]
            kept = df[~drop_mask(df, f"{name}-{side}", 0.2, "global", 1)][name]
            assert len(dropped) == n
            assert (dropped.min() >= kept.max()) if side == "high" else (dropped.max() <= kept.min()), (name, side)
    code, out = cli("prune", "-c", str(TINY), "--run-dir", str(tiny_copy), "-q",
                    "--set", "prune.strategies=[grand-high,tracin-low]")
    assert code == 0, out
    for run in ("grand-high-0.2", "tracin-low-0.2"):
        assert len(RunLayout(tiny_copy).kept_ids(run).read_text().splitlines()) == len(df) - n

