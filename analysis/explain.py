"""`tune-cells explain`: Captum attribution maps of the champion classifier, one image grid per input.

Integrated gradients (from a black image), the same smoothed with a noise tunnel (SmoothGrad²),
and occlusion, each for the predicted class, on exactly the input the model sees (decoded and
preprocessed by the model's own eval preset).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

METHODS = ("integrated gradients", "noise tunnel (SmoothGrad² on IG)", "occlusion")


def attributions(model: torch.nn.Module, x: torch.Tensor, target: int, steps: int = 32,
                 noise_samples: int = 8) -> dict[str, np.ndarray]:
    """H×W attribution magnitude per method for one preprocessed input `x` (1×C×H×W)."""
    from captum.attr import IntegratedGradients, NoiseTunnel, Occlusion

    model.eval()
    baseline = torch.zeros_like(x)
    ig = IntegratedGradients(model)
    window = max(4, x.shape[-1] // 8)
    gradients = ig.attribute(x, baselines=baseline, target=target, n_steps=steps)
    smoothed = NoiseTunnel(ig).attribute(x, baselines=baseline, target=target, n_steps=steps // 2,
                                         nt_type="smoothgrad_sq", nt_samples=noise_samples, stdevs=0.15)
    occluded = Occlusion(model).attribute(x, target=target, sliding_window_shapes=(x.shape[1], window, window),
                                          strides=(x.shape[1], window // 2, window // 2), baselines=0.0,
                                          perturbations_per_eval=64)  # batched: 1 per pass is 50x slower
    magnitude = lambda a: a.detach()[0].abs().sum(0).numpy()  # noqa: E731
    # Occlusion keeps its sign: a drop in the class score (positive) is evidence for the class.
    return {METHODS[0]: magnitude(gradients), METHODS[1]: magnitude(smoothed),
            METHODS[2]: occluded.detach()[0].sum(0).numpy()}


def explain_file(classifier, path: Path, output: Path, steps: int = 32, stem: str | None = None) -> dict:
    """Write `<output>/<stem>_attributions.png` (the file's stem by default); return the prediction shown."""
    output.mkdir(parents=True, exist_ok=True)
    return explain_image(classifier, classifier.decode_path(path), Path(path).name,
                         output / f"{stem or Path(path).stem}_attributions.png", steps)


def explain_image(classifier, image: np.ndarray, name: str, figure: Path, steps: int = 32) -> dict:
    """Write the attribution grid of one decoded image to the new file `figure` (never replacing
    one); return the prediction shown, the model's own as `predict` gives it."""
    # The class and probability shown are `predict_proba`'s: with the model's temperature and test-time
    # augmentation. The maps are computed on the plain network (a fold ensemble: its members' mean
    # probability) for the one view the model sees without augmentation: attribution follows one
    # differentiable forward pass, and the eight TTA views would each need their own maps.
    probs = classifier.predict_proba(image[None])[0]
    target = int(probs.argmax())
    x = classifier.preset(image[None]).to(classifier.device)
    maps = attributions(classifier.model, x, target, steps)
    shown = _display_image(x[0].cpu(), classifier.preset)
    fig = Figure(figsize=(13, 3.6), dpi=110)
    axes = fig.subplots(1, 4)
    axes[0].imshow(shown, cmap="gray" if shown.ndim == 2 else None)
    axes[0].set_title(f"input: {classifier.spec.classes[target]} (p={probs[target]:.3f})", fontsize=9, parse_math=False)
    grey = shown if shown.ndim == 2 else shown.mean(-1)
    for ax, (method, values) in zip(axes[1:], maps.items()):
        ax.imshow(grey, cmap="gray")
        signed = method == METHODS[2]  # occlusion: drop in the class score, positive = evidence
        # Clip at the 99th percentile: a few extreme pixels (squared in SmoothGrad²) would hide the rest.
        limit = float(np.percentile(np.abs(values), 99)) or float(np.abs(values).max()) or 1.0
        ax.imshow(values, cmap="bwr" if signed else "inferno", alpha=0.6,
                  vmin=-limit if signed else 0, vmax=limit)
        ax.set_title(method, fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    # parse_math off: a file name with two '$' is no TeX (matplotlib raised ValueError, exit 1)
    fig.suptitle(f"{name}: attributions for {classifier.spec.classes[target]}", fontsize=10, parse_math=False)
    fig.tight_layout()
    with open(figure, "xb") as file:  # "x": a file that appeared since the command's check is not replaced
        fig.savefig(file, format="png")
    return {"predicted_class": classifier.spec.classes[target], "probability": float(probs[target]),
            "figure": str(figure)}


def _display_image(x: torch.Tensor, preset) -> np.ndarray:
    """Undo the normalisation of a preprocessed C×H×W input, for display."""
    mean = torch.tensor(preset.mean).view(-1, 1, 1)
    std = torch.tensor(preset.std).view(-1, 1, 1)
    image = (x * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    return image[..., 0] if image.shape[-1] == 1 else image
