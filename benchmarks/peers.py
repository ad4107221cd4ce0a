"""The MONAI peer: what a user would otherwise run over the same network and weights."""

from __future__ import annotations

import numpy as np


def agreement(ours, theirs, temperature: float) -> dict:
    import torch

    p1 = torch.softmax(ours / temperature, 0)
    p2 = torch.softmax(theirs / temperature, 0)
    a, b = p1.argmax(0), p2.argmax(0)
    dices = {}
    for c in range(1, p1.shape[0]):
        x, y = a == c, b == c
        n = int(x.sum()) + int(y.sum())
        if n:
            dices[c] = 2.0 * int((x & y).sum()) / n
    fg_x, fg_y = a > 0, b > 0
    n_fg = int(fg_x.sum()) + int(fg_y.sum())
    return {
        "dice_mean": float(np.mean(list(dices.values()))) if dices else 1.0,
        "dice_min": float(min(dices.values())) if dices else 1.0,
        "dice_foreground": 2.0 * int((fg_x & fg_y).sum()) / n_fg if n_fg else 1.0,
        "voxel_agreement": float((a == b).float().mean()),
        "max_abs_prob_diff": float((p1 - p2).abs().max()),
        "max_abs_logit_diff": float((ours - theirs).abs().max()),
    }


def monai_sliding_window(net, array: np.ndarray, window, device, **blending):
    """MONAI's ``sliding_window_inference`` over ``net`` at equal settings: the same window placement
    (ours follows MONAI's) and, unless ``blending`` says otherwise, the same Gaussian blending (our
    sigma = patch/8 map, given to MONAI). ``net`` runs as loaded: an unprepared model is PyTorch's layers."""
    import torch
    from monai.inferers import sliding_window_inference

    from MultiTaskSegLib.inference import autocast_context, gaussian_importance

    gmap = torch.from_numpy(gaussian_importance(window.patch_size)).to(device)
    x = torch.from_numpy(array)[None, None].to(device)
    with torch.inference_mode(), autocast_context(device):
        y = sliding_window_inference(
            x,
            tuple(window.patch_size),
            window.batch_size,
            lambda t: net(t)[0],
            overlap=window.overlap,
            padding_mode="constant",
            cval=0.0,
            **(blending or {"roi_weight_map": gmap}),
        )
    return y[0].float().cpu()


def monai_pipeline(spec: dict) -> dict:
    """What a user would otherwise write with MONAI, end to end, timed stage by stage, ``repeats`` times:

    LoadImaged → EnsureChannelFirstd → Orientationd → Spacingd → intensity scaling →
    sliding_window_inference → softmax → Invertd (probabilities back to the input grid) → argmax →
    SaveImaged. The same network and weights (unprepared: PyTorch's layers), window, overlap,
    Gaussian weight map, target spacing and intensity rule as ours (for the modality ours detected);
    the network sees the orientation it was trained on (LPS; its windows transposed to z, y, x).
    """
    import time
    from pathlib import Path

    import torch
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        Orientationd,
        SaveImaged,
        ScaleIntensityRanged,
        ScaleIntensityRangePercentilesd,
        Spacingd,
    )

    from MultiTaskSegLib.bundle import load_bundle
    from MultiTaskSegLib.inference import gaussian_importance

    bundle = load_bundle(spec["bundle"])
    net = bundle.load_model("cpu")
    window, config = bundle.window, bundle.preprocessing
    if spec["modality"] == "CT":
        intensity = ScaleIntensityRanged("image", *config.ct_window, b_min=0.0, b_max=1.0, clip=True)
    else:
        intensity = ScaleIntensityRangePercentilesd("image", *config.mr_percentiles, b_min=0.0, b_max=1.0, clip=True)
    load = Compose([LoadImaged("image"), EnsureChannelFirstd("image")])
    prepare = Compose(
        [
            Orientationd("image", axcodes="LPS"),
            Spacingd("image", pixdim=tuple(config.target_spacing), mode="bilinear"),
            intensity,
        ]
    )
    invert = Invertd("pred", transform=prepare, orig_keys="image", nearest_interp=False)
    argmax = AsDiscreted("pred", argmax=True)
    out = Path(spec["out_dir"])
    save = SaveImaged(
        "pred",
        output_dir=str(out),
        output_postfix="monai_seg",
        separate_folder=False,
        output_dtype=np.uint8,
        resample=False,
        print_log=False,
    )
    roi = tuple(window.patch_size[::-1])  # MONAI's arrays are (x, y, z)
    weights = torch.from_numpy(np.ascontiguousarray(gaussian_importance(window.patch_size).transpose(2, 1, 0)))

    def network(t: torch.Tensor) -> torch.Tensor:  # (x, y, z) windows → the (z, y, x) the network knows
        return net(t.permute(0, 1, 4, 3, 2).contiguous())[0].permute(0, 1, 4, 3, 2)

    runs = []
    for _ in range(spec["repeats"]):
        stages, t0, c0 = {}, time.perf_counter(), time.process_time()
        data = load({"image": spec["path"]})
        stages["load"], t = time.perf_counter() - t0, time.perf_counter()
        data = prepare(data)
        stages["preprocess"], t = time.perf_counter() - t, time.perf_counter()
        with torch.inference_mode():
            logits = sliding_window_inference(
                data["image"][None],
                roi,
                window.batch_size,
                network,
                overlap=window.overlap,
                padding_mode="constant",
                cval=0.0,
                roi_weight_map=weights,
            )
            stages["inference"], t = time.perf_counter() - t, time.perf_counter()
            data["pred"] = torch.softmax(logits[0], 0)
            stages["softmax"], t = time.perf_counter() - t, time.perf_counter()
            data = invert(data)
            stages["invert"], t = time.perf_counter() - t, time.perf_counter()
            data = argmax(data)
            stages["argmax"], t = time.perf_counter() - t, time.perf_counter()
            save(data)
            stages["save"] = time.perf_counter() - t
        stages["total"] = time.perf_counter() - t0
        stages["cpu_total"] = time.process_time() - c0
        runs.append(stages)
        del data, logits
    seg = out / f"{Path(spec['path']).name.split('.')[0]}_monai_seg.nii.gz"
    return {"name": spec["name"], "runs": runs, "seg_path": str(seg), "canonical_shape_xyz": list(roi)}


def segmentation_agreement(ours_path: str, theirs_path: str, keep: list[int] | None = None) -> dict:
    """Dice per label (mean, min over the labels either uses) between two label files on the same grid;
    ``keep``: the labels of the context ours recognised (ours keeps only those), the rest of theirs → 0."""
    import SimpleITK as sitk

    a = sitk.GetArrayFromImage(sitk.ReadImage(ours_path))
    b = (
        sitk.GetArrayFromImage(sitk.ReadImage(theirs_path)).reshape(a.shape)
        if np.prod(sitk.ReadImage(theirs_path).GetSize()) == a.size
        else None
    )
    if b is None:
        return {"error": "the two segmentations have different sizes"}
    if keep is not None:
        b = np.where(np.isin(b, keep), b, 0)
    dices = []
    for c in np.union1d(np.unique(a), np.unique(b)):
        if c == 0:
            continue
        x, y = a == c, b == c
        dices.append(2.0 * float((x & y).sum()) / float(x.sum() + y.sum()))
    return {
        "dice_mean": float(np.mean(dices)) if dices else 1.0,
        "dice_min": float(min(dices)) if dices else 1.0,
        "voxel_agreement": float((a == b).mean()),
    }
