"""Attention pooling, TaskVAE scores and the vectorised router."""

import numpy as np
import pytest
import torch

from models.errors import ShapeError
from models.pooling import attention_pool
from models.router import IDENTITY_INDEX, Router, StackedVAEScorer, choose_routes
from models.vae import TaskVAE
from float32 import SAME_LIBRARY, f32_tol, peak, vae_score_tol


def numpy_attention_pool(z: np.ndarray, t: float) -> np.ndarray:
    out = []
    for zb in z.astype(np.float64):
        c = zb.shape[0]
        s = np.sqrt((zb**2).sum(0)) / c
        a = np.exp(s / t - (s / t).max())
        a /= a.sum()
        out.append((zb * a[None]).sum((1, 2)))
    return np.stack(out)


@pytest.mark.parametrize("t", [1.0, 0.05])
def test_attention_pool_matches_numpy_formula(t):
    z = torch.randn(3, 256, 16, 16, generator=torch.Generator().manual_seed(1)) * 4
    got = attention_pool(z, t).numpy()
    # float32 against float64: sums over 256 channels (norms) and 16×16 tokens (pooling) of
    # terms up to max |z|.
    np.testing.assert_allclose(got, numpy_attention_pool(z.numpy(), t), rtol=0, atol=f32_tol(peak(z), n=256))
    assert sum(p.numel() for p in Router([]).parameters()) == 0


def test_attention_pool_rejects_flat_features():
    with pytest.raises(ShapeError, match="B×C×H×W"):
        attention_pool(torch.zeros(2, 256))


def _vaes(n: int, seed: int = 0) -> list[TaskVAE]:
    torch.manual_seed(seed)
    vaes = [TaskVAE() for _ in range(n)]
    for v in vaes:  # non-zero biases so the stacking of every tensor is exercised
        for p in v.parameters():
            if p.ndim == 1:
                torch.nn.init.normal_(p, std=0.1)
    return vaes


def test_vae_architecture_and_init():
    v = TaskVAE()
    assert [tuple(v.encoder[0].weight.shape), tuple(v.fc_mu.weight.shape), tuple(v.fc_logvar.weight.shape)] == [
        (128, 256), (64, 128), (64, 128)]
    assert tuple(v.decoder[0].weight.shape) == (128, 64) and tuple(v.decoder[2].weight.shape) == (256, 128)
    assert all(float(m.bias.abs().sum()) == 0 for m in v.modules() if isinstance(m, torch.nn.Linear))
    bound = (6 / (256 + 128)) ** 0.5
    assert float(v.encoder[0].weight.abs().max()) <= bound


def test_vae_score_formula():
    v = _vaes(1)[0]
    f = torch.randn(4, 256)
    mu, logvar = v.encode(f)
    recon = v.decoder(mu)
    expected = ((f - recon) ** 2).mean(1) + 16.5 * (0.5 * (mu**2 + logvar.exp() - 1 - logvar)).sum(1)
    torch.testing.assert_close(v.score(f), expected, rtol=0, atol=vae_score_tol(expected, k=SAME_LIBRARY))
    assert torch.equal(v.score(f), v.score(f)), "scores must be deterministic (z = mu)"
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    assert v.training_loss(f, g1) != v.training_loss(f, g2), "training path must sample z"


def test_vectorised_scores_equal_separate_vae_scores():
    vaes = _vaes(7)
    f = torch.randn(5, 256) * 3
    stacked = StackedVAEScorer(vaes)(f)
    separate = torch.stack([v.score(f) for v in vaes], dim=1)
    assert stacked.shape == (5, 7)
    # One library; batched matmuls sum the 256 features in another order.
    np.testing.assert_allclose(stacked.detach().numpy(), separate.detach().numpy(), rtol=0,
                               atol=vae_score_tol(separate.detach(), k=SAME_LIBRARY))


def test_router_scores_are_deterministic_and_pool_raw_features():
    router = Router(_vaes(3))
    emb = torch.randn(2, 256, 64, 64)
    p1, s1 = router(emb)
    p2, s2 = router(emb)
    assert torch.equal(s1, s2) and torch.equal(p1, p2)
    assert torch.equal(p1, attention_pool(emb)), "the router pools with attention_pool itself"


def test_choose_routes_argmin_threshold_and_ties():
    scores = torch.tensor([[3.0, 1.0, 2.0], [1.0, 1.0, 5.0], [9.0, 8.0, 7.5], [0.5, 0.2, 0.2]])
    thresholds = torch.tensor([10.0, 1.5, 7.0])
    routes = choose_routes(scores, thresholds)
    # row 0: argmin 1, 1.0 <= 1.5 -> 1; row 1: tie 0/1 -> lower index 0, 1.0 <= 10 -> 0
    # row 2: argmin 2, 7.5 > 7.0 -> identity; row 3: tie 1/2 -> 1, 0.2 <= 1.5 -> 1
    assert routes.tolist() == [1, 0, IDENTITY_INDEX, 1]


def test_choose_routes_with_no_tasks_is_identity():
    assert choose_routes(torch.zeros(2, 0), torch.zeros(0)).tolist() == [IDENTITY_INDEX, IDENTITY_INDEX]


def test_router_rejects_wrong_shapes():
    with pytest.raises(ShapeError, match="B×256"):
        StackedVAEScorer(_vaes(1))(torch.zeros(2, 128))
    with pytest.raises(ShapeError, match="embeddings"):
        Router(_vaes(1))(torch.zeros(2, 256))
