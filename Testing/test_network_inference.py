"""Network, sliding-window blending, Gram-based signatures, uncertainty and MC dropout."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import phantoms
from MultiTaskSegLib.inference import WindowConfig, autocast_context, gaussian_importance, sliding_window, window_starts
from MultiTaskSegLib.network import NetworkConfig, enable_mc_dropout
from MultiTaskSegLib.ood import signature_from_grams
from MultiTaskSegLib.predictor import PredictOptions, Predictor
from MultiTaskSegLib.uncertainty import normalised_entropy, restrict_labels, softmax_with_temperature

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(untrained_bundle):
    torch.manual_seed(0)
    return untrained_bundle.load_model(CPU)


def _direct_signature(feature_map: np.ndarray) -> np.ndarray:
    """The method written out: (voxels × channels) matrix / sqrt(voxels) → SVD → log → unit norm."""
    c = feature_map.shape[0]
    matrix = feature_map.reshape(c, -1).T / np.sqrt(feature_map.reshape(c, -1).shape[1])
    s = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
    log_s = np.log(s)
    return log_s / np.sqrt((log_s**2).sum())


def test_network_shapes_taps_and_context_head(model):
    x = torch.rand(1, 1, 32, 32, 32)
    logits, feats = model(x, taps=model.layer_names)
    assert logits.shape == (1, model.config.out_channels, 32, 32, 32)
    assert set(model.layer_names) <= set(feats)
    widths = model.config.widths
    assert feats["enc2"].shape == (1, widths[2], 8, 8, 8)
    assert feats["dec0"].shape == (1, widths[0], 32, 32, 32)
    assert feats["context"].shape == (1, model.config.n_contexts)
    assert model.divisor == 4
    assert NetworkConfig.from_dict(model.config.to_dict()) == model.config


def test_window_starts_cover_with_requested_overlap():
    assert window_starts(20, 32, 0.5) == [0]
    for size, patch, overlap in [(40, 32, 0.5), (100, 32, 0.5), (33, 32, 0.25), (97, 16, 0.6)]:
        starts = window_starts(size, patch, overlap)
        assert starts[0] == 0 and starts[-1] == size - patch
        steps = np.diff(starts)
        assert np.all(steps > 0) and np.all(steps <= patch * (1 - overlap) + 1)


def test_gaussian_importance_is_the_nnunet_gaussian():
    g = gaussian_importance((16, 8, 12))
    assert g.shape == (16, 8, 12) and g.max() == pytest.approx(1.0) and g.min() > 0
    # independent: separable Gaussian with sigma = n/8, centred between the middle voxels
    axes = [np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2) / (n / 8)) ** 2) for n in (16, 8, 12)]
    ref = np.einsum("i,j,k->ijk", *axes)
    np.testing.assert_allclose(g, ref / ref.max(), rtol=1e-5, atol=1e-7)


def test_one_window_equals_a_whole_volume_forward_pass(model):
    rng = np.random.default_rng(0)
    array = rng.random((32, 32, 32), dtype=np.float32)
    result = sliding_window(model, array, WindowConfig((32, 32, 32), 0.5, 2), CPU)
    assert result.n_windows == 1
    with torch.no_grad():
        direct, feats = model(torch.from_numpy(array)[None, None])
    torch.testing.assert_close(result.logits, direct[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.context_logits, feats["context"][0].numpy(), rtol=1e-5, atol=1e-6)


def test_input_smaller_than_the_patch_equals_a_padded_forward_pass(model):
    rng = np.random.default_rng(1)
    array = rng.random((20, 27, 32), dtype=np.float32)
    result = sliding_window(model, array, WindowConfig((32, 32, 32), 0.5, 2), CPU)
    assert tuple(result.logits.shape[1:]) == array.shape
    padded = np.zeros((32, 32, 32), np.float32)
    padded[6:26, 2:29, :] = array  # padding split as evenly as possible, the extra voxel after
    with torch.no_grad():
        direct, _ = model(torch.from_numpy(padded)[None, None])
    torch.testing.assert_close(result.logits, direct[0, :, 6:26, 2:29, :], rtol=1e-5, atol=1e-5)


class _WindowMeanModel(torch.nn.Module):
    """Logits constant over each window, equal to the window's mean input (channel c: c × mean)."""

    def __init__(self, out_channels: int = 2):
        super().__init__()
        self.config = NetworkConfig(out_channels=out_channels, widths=(2,))

    def forward(self, x, taps=()):
        m = x.mean(dim=(1, 2, 3, 4)).view(-1, 1, 1, 1, 1)
        scale = torch.arange(self.config.out_channels, dtype=x.dtype).view(1, -1, 1, 1, 1)
        return (m * scale).expand(-1, -1, *x.shape[2:]).clone(), {}


class _ConstantModel(_WindowMeanModel):
    def forward(self, x, taps=()):
        out = torch.full((x.shape[0], self.config.out_channels, *x.shape[2:]), 3.25)
        out[:, 0] = -1.5
        return out, {}


def test_blend_of_constant_logits_is_constant():
    array = np.random.default_rng(2).random((40, 52, 36), dtype=np.float32)
    result = sliding_window(_ConstantModel(), array, WindowConfig((16, 16, 16), 0.5, 3), CPU)
    assert result.n_windows > 8
    np.testing.assert_allclose(result.logits[0].numpy(), -1.5, rtol=1e-6)
    np.testing.assert_allclose(result.logits[1].numpy(), 3.25, rtol=1e-6)


def test_blend_is_the_gaussian_weighted_average_of_windows():
    shape, patch, overlap = (24, 30, 20), (16, 16, 16), 0.5
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    array = (0.01 * x + 0.1 * y + 1.0 * z).astype(np.float32)  # every window has a different mean
    result = sliding_window(_WindowMeanModel(), array, WindowConfig(patch, overlap, 2), CPU)
    # expectation, computed here: windows every ⌊p·(1 − overlap)⌋ voxels, the last one ending at the border
    num = np.zeros(shape)
    den = np.zeros(shape)
    sig = [p / 8 for p in patch]
    axes = [np.exp(-0.5 * ((np.arange(p) - (p - 1) / 2) / s) ** 2) for p, s in zip(patch, sig)]
    g = np.einsum("i,j,k->ijk", *axes)
    g /= g.max()
    starts = [sorted({min(k * int(p * (1 - overlap)), n - p) for k in range(n)}) for n, p in zip(shape, patch)]
    n_windows = 0
    for a in starts[0]:
        for b in starts[1]:
            for c in starts[2]:
                sl = (slice(a, a + 16), slice(b, b + 16), slice(c, c + 16))
                num[sl] += g * array[sl].astype(np.float64).mean()
                den[sl] += g
                n_windows += 1
    assert result.n_windows == n_windows
    np.testing.assert_allclose(result.logits[1].numpy(), num / den, rtol=1e-4)
    np.testing.assert_allclose(result.logits[0].numpy(), 0.0, atol=1e-6)


def test_signature_from_accumulated_gram_equals_direct_svd_of_the_tapped_features(model, untrained_bundle):
    """One window covering the volume: the Gram-derived signature is the SVD signature of model(x, taps)."""
    layers = list(untrained_bundle.meta["ood"]["layers"])
    array = np.random.default_rng(3).random((32, 32, 32), dtype=np.float32)
    result = sliding_window(model, array, WindowConfig((32, 32, 32), 0.5, 1), CPU, taps=layers)
    with torch.no_grad():
        _, feats = model(torch.from_numpy(array)[None, None], taps=layers)
    for layer in layers:
        fmap = feats[layer][0].numpy()
        c = fmap.shape[0]
        x = fmap.reshape(c, -1).T.astype(np.float64)
        np.testing.assert_allclose(result.gram[layer], x.T @ x / x.shape[0], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(
            signature_from_grams(result.gram, [layer]), _direct_signature(fmap), rtol=1e-4, atol=1e-5
        )
    concatenated = np.concatenate([_direct_signature(feats[k][0].numpy()) for k in layers])
    np.testing.assert_allclose(signature_from_grams(result.gram, layers), concatenated, rtol=1e-4, atol=1e-5)


def test_gram_of_several_windows_counts_each_voxel_once(model):
    """Overlapping windows: with voxelwise features, the accumulated Gram is XᵀX / V over the image's voxels."""

    class Voxelwise(_ConstantModel):
        def forward(self, x, taps=()):
            logits, _ = super().forward(x)
            return logits, {"f": torch.cat([x, x * x, torch.sin(3 * x)], dim=1)}

    array = np.random.default_rng(4).random((28, 40, 20), dtype=np.float32)
    result = sliding_window(Voxelwise(), array, WindowConfig((16, 16, 16), 0.5, 3), CPU, taps=["f"])
    assert result.n_windows > 8
    v = array.reshape(-1).astype(np.float64)
    features = np.stack([v, v * v, np.sin(3 * v)], axis=1)
    np.testing.assert_allclose(result.gram["f"], features.T @ features / len(v), rtol=1e-5)
    # and the real network's Gram over several windows is symmetric positive semi-definite
    real = sliding_window(model, array[:, :24], WindowConfig((16, 16, 16), 0.25, 4), CPU, taps=["enc2"])
    np.testing.assert_allclose(real.gram["enc2"], real.gram["enc2"].T, rtol=1e-5, atol=1e-8)
    assert np.linalg.eigvalsh(real.gram["enc2"]).min() > -1e-6


def test_padding_does_not_enter_the_signature():
    """A feature map that is 2 on the image and 0 on the padding: Gram = 4 exactly (mean over image voxels)."""

    class Ones(_ConstantModel):
        def forward(self, x, taps=()):
            logits, _ = super().forward(x)
            return logits, {"f": 2.0 * x}

    array = np.ones((10, 20, 16), np.float32)
    result = sliding_window(Ones(), array, WindowConfig((16, 16, 16), 0.5, 1), CPU, taps=["f"])
    np.testing.assert_allclose(result.gram["f"], [[4.0]], rtol=1e-5)


class _VoxelFeaturesAndContext(_ConstantModel):
    """Voxelwise features (x, x², sin 3x) and a context logit per window = [window mean, 1]."""

    def forward(self, x, taps=()):
        logits, _ = super().forward(x)
        context = torch.stack([x.mean(dim=(1, 2, 3, 4)), torch.ones(x.shape[0])], dim=1)
        return logits, {"f": torch.cat([x, x * x, torch.sin(3 * x)], dim=1), "context": context}


def test_foreground_threshold_weights_each_windows_context_by_its_foreground_share():
    """With ``foreground_threshold`` the context logits are the windows' mean weighted by each window's share of
    voxels above it (a window of pure background counts for nothing); the Gram (the OOD signature) and the
    segmentation logits do not change."""
    rng = np.random.default_rng(7)
    body = rng.random((20, 24, 18), dtype=np.float32) * 0.8 + 0.2  # all above 0.1
    body[:4] = 0.0  # some background inside the image too
    padded = np.pad(body, ((8, 8), (20, 20), (6, 6)))  # a larger field of view of background
    model = _VoxelFeaturesAndContext()
    config = WindowConfig((16, 16, 16), 0.5, 3, foreground_threshold=0.1)
    weighted = sliding_window(model, padded, config, CPU, taps=["f"])
    plain = sliding_window(model, padded, WindowConfig((16, 16, 16), 0.5, 3), CPU, taps=["f"])
    windows = [
        padded[z : z + 16, y : y + 16, x : x + 16]
        for z in window_starts(padded.shape[0], 16, 0.5)
        for y in window_starts(padded.shape[1], 16, 0.5)
        for x in window_starts(padded.shape[2], 16, 0.5)
    ]
    share = np.array([(w > 0.1).mean() for w in windows])
    means = np.array([w.mean() for w in windows])
    assert (share == 0).sum() > 4  # windows of pure background, which count for nothing
    np.testing.assert_allclose(weighted.context_logits, [(share * means).sum() / share.sum(), 1.0], rtol=1e-5)
    np.testing.assert_allclose(plain.context_logits, [means.mean(), 1.0], rtol=1e-5)
    np.testing.assert_array_equal(weighted.gram["f"], plain.gram["f"])
    assert torch.equal(weighted.logits, plain.logits)


def test_foreground_threshold_above_every_voxel_weights_every_window_alike():
    """An image with nothing above the threshold: a plain mean (as without one), never a 0/0."""
    array = np.random.default_rng(8).random((20, 20, 20), dtype=np.float32) * 0.05
    model = _VoxelFeaturesAndContext()
    high = sliding_window(model, array, WindowConfig((16, 16, 16), 0.5, 2, foreground_threshold=0.5), CPU, ["f"])
    plain = sliding_window(model, array, WindowConfig((16, 16, 16), 0.5, 2), CPU, ["f"])
    assert np.isfinite(high.context_logits).all()
    np.testing.assert_allclose(high.context_logits, plain.context_logits, rtol=1e-6)


def test_flip_tta_runs_and_keeps_shapes(model):
    array = np.random.default_rng(5).random((16, 16, 16), dtype=np.float32)
    plain = sliding_window(model, array, WindowConfig((16, 16, 16), 0.5, 1), CPU)
    tta = sliding_window(model, array, WindowConfig((16, 16, 16), 0.5, 1, tta_flips=True), CPU)
    assert tta.logits.shape == plain.logits.shape and torch.isfinite(tta.logits).all()
    # a flip-equivariant model (the constant one) is unchanged by TTA
    const = sliding_window(_ConstantModel(), array, WindowConfig((16, 16, 16), 0.5, 1, tta_flips=True), CPU)
    np.testing.assert_allclose(const.logits[1].numpy(), 3.25, rtol=1e-6)


def test_autocast_is_a_no_op_on_cpu():
    with autocast_context(CPU):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.float32


def test_normalised_entropy_range_uniform_and_certain():
    uniform = torch.full((4, 3, 3, 3), 0.25)
    np.testing.assert_allclose(normalised_entropy(uniform).numpy(), 1.0, rtol=1e-6)
    onehot = torch.zeros(4, 3, 3, 3)
    onehot[2] = 1.0
    np.testing.assert_allclose(normalised_entropy(onehot).numpy(), 0.0, atol=1e-6)
    logits = torch.randn(5, 6, 7, 8) * 4
    h = normalised_entropy(softmax_with_temperature(logits, 1.7))
    assert h.shape == (6, 7, 8) and float(h.min()) >= 0.0 and float(h.max()) <= 1.0
    # hand value: p = (0.5, 0.5, 0) over 3 classes → ln 2 / ln 3
    p = torch.tensor([0.5, 0.5, 0.0])[:, None]
    assert float(normalised_entropy(p)[0]) == pytest.approx(np.log(2) / np.log(3), rel=1e-6)
    assert float(normalised_entropy(p, n_classes=2)[0]) == pytest.approx(1.0, rel=1e-6)


def test_temperature_softens_and_restriction_drops_other_contexts_labels():
    logits = torch.tensor([2.0, 0.0, -1.0])[:, None]
    p1 = softmax_with_temperature(logits, 1.0)
    p3 = softmax_with_temperature(logits, 3.0)
    assert float(p3.max()) < float(p1.max())
    np.testing.assert_allclose(p3.sum(0).numpy(), 1.0, rtol=1e-6)
    labels = np.array([0, 1, 2, 3, 2, 1], dtype=np.uint8)
    np.testing.assert_array_equal(restrict_labels(labels, [1, 3]), [0, 1, 0, 3, 0, 1])


def test_mc_dropout_is_stochastic_and_eval_mode_deterministic(model):
    x = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(6))
    model.eval()
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(x)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        enable_mc_dropout(model, True)
        try:
            torch.manual_seed(1)
            c, _ = model(x)
            d, _ = model(x)
        finally:
            enable_mc_dropout(model, False)
        e, _ = model(x)
    assert not torch.allclose(c, d)
    assert not torch.allclose(c, a)
    torch.testing.assert_close(e, a, rtol=0, atol=0)
    assert all(not m.training for m in model.modules())


def test_predictor_mc_dropout_changes_the_uncertainty_only_when_asked(untrained_bundle):
    image, _ = phantoms.ct_phantom((20, 20, 10), (4.0, 4.0, 4.0), seed=9)
    predictor = Predictor(untrained_bundle, "cpu")
    plain1 = predictor.predict(image, PredictOptions(device="cpu"))
    plain2 = predictor.predict(image, PredictOptions(device="cpu"))
    u1 = sitk.GetArrayFromImage(plain1.uncertainty)
    np.testing.assert_array_equal(u1, sitk.GetArrayFromImage(plain2.uncertainty))
    torch.manual_seed(2)
    mc = predictor.predict(image, PredictOptions(device="cpu", mc_dropout=2))
    um = sitk.GetArrayFromImage(mc.uncertainty)
    assert not np.allclose(um, u1)
    assert um.dtype == np.float32 and um.min() >= 0.0 and um.max() <= 1.0
    # the OOD score comes from the deterministic pass, so it is unchanged by MC dropout
    assert mc.ood.score == pytest.approx(plain1.ood.score, rel=1e-6)
    assert all(not m.training for m in predictor.model.modules())


def test_merging_other_contexts_gives_the_marginal_distribution():
    from MultiTaskSegLib.uncertainty import merge_other_contexts

    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])[:, None]  # background, A1, B1, B2
    merged = merge_other_contexts(probs, [1])
    np.testing.assert_allclose(merged.numpy()[:, 0], [0.8, 0.2], rtol=1e-6)
    # certain background + an impossible structure → certain (entropy 0) once merged
    probs = torch.tensor([0.5, 0.0, 0.5])[:, None]
    assert float(normalised_entropy(merge_other_contexts(probs, [1]))) == pytest.approx(0.0, abs=1e-6)
