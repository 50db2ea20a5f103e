import math

import pytest
import torch
from torch.nn import functional as F

from benchmark.losses import LOSSES, get_loss


def _z(n=4, seed=0):
    return torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3


def test_symmetric_ce_matches_hand_formula():
    z = _z()
    n = z.shape[0]
    row = -sum(math.log(math.exp(z[i, i]) / sum(math.exp(z[i, k]) for k in range(n))) for i in range(n)) / n
    col = -sum(math.log(math.exp(z[i, i]) / sum(math.exp(z[k, i]) for k in range(n))) for i in range(n)) / n
    assert get_loss("ce")(z, None).item() == pytest.approx(0.5 * (row + col), rel=1e-12)


def test_infonce_with_identity_target_is_symmetric_ce():
    z = _z()
    assert torch.allclose(get_loss("infonce")(z, torch.eye(4, dtype=z.dtype)), get_loss("ce")(z, None))
    assert torch.allclose(get_loss("infonce")(z, None), get_loss("ce")(z, None))


def test_wbce_matches_hand_formula_and_mask_has_no_gradient():
    z = _z()
    s = torch.eye(4, dtype=z.dtype) * 0.9 + 0.05
    s.requires_grad_(True)
    p = torch.sigmoid(z)
    ell = -s * torch.log(p + 1e-6) - (1 - s) * torch.log(1 - p + 1e-6)
    pos = torch.eye(4, dtype=torch.bool)
    expected = 0.5 * (ell[pos].sum() / (4 + 1e-6) + ell[~pos].sum() / (12 + 1e-6))
    got = get_loss("wbce")(z, s)
    assert torch.allclose(got, expected)
    (g,) = torch.autograd.grad(got, s)
    p = p.detach()
    manual = torch.where(pos, (-torch.log(p + 1e-6) + torch.log(1 - p + 1e-6)) / (2 * (4 + 1e-6)),
                         (-torch.log(p + 1e-6) + torch.log(1 - p + 1e-6)) / (2 * (12 + 1e-6)))
    assert torch.allclose(g, manual)


def test_cwcl_normalises_rows():
    z = _z()
    s = torch.rand(4, 4, dtype=z.dtype, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(get_loss("cwcl")(z, 3 * s), get_loss("cwcl")(z, s), atol=1e-5)
    assert not torch.allclose(get_loss("infonce")(z, 3 * s), get_loss("infonce")(z, s))


def test_kl_bce_mse_against_torch_definitions():
    z, s = _z(), torch.eye(4, dtype=torch.float64)
    def elem_mean_kl(logits, target):
        q = F.softmax(10 * target, 1)
        return (q * (q.log() - F.log_softmax(logits, 1))).mean()

    kl = 0.5 * (elem_mean_kl(z, s) + elem_mean_kl(z.T, s.T))
    assert torch.allclose(get_loss("kl")(z, s), kl)
    assert torch.allclose(get_loss("bce")(z, s), F.binary_cross_entropy(torch.sigmoid(z), s))
    assert torch.allclose(get_loss("mse")(z, s), ((torch.sigmoid(z) - s) ** 2).mean())


def test_unknown_loss_names_the_choices():
    with pytest.raises(ValueError, match="choose one of"):
        get_loss("hinge")
    assert set(LOSSES) == {"ce", "wbce", "infonce", "cwcl", "kl", "bce", "mse"}
