"""The course's benchmark: every reference method against its peer and its minimum, and
what autograding costs against running the notebook.

    python benchmarks/run.py [--quick] [--device cuda] [--models toynet,lite0]
                             [--skip-notebooks] [--out build/bench.md]

For each reference method, on the same model and inputs, three functions are timed
*alternately* (one sample of each in turn, after one warm-up call each), so that a busy
machine slows them alike, and the medians are reported:

* **ours**: the reference in ``cs_helpers.reference.<topic>``;
* **peer**: an independent library configured to compute the same thing with the same
  work (Captum, pytorch-grad-cam, torchattacks, scikit-learn, ``torch``);
* **minimum**: the work no implementation can avoid (for a gradient method one forward
  and one backward pass of the batch; for occlusion the windows' forward passes in
  batches of the same size; for PGD ``steps`` forward-backward passes).

with the ratios ours / peer and ours / minimum (below 1: ours is faster). Models:
ToyNet on 64 px ToyWorld scenes and EfficientNet-Lite0 at 224 px, batch 1 and 16
where the method takes a batch. The notes column says what a peer computes
differently and whether its result was checked equal.

The notebook section (skipped with ``--skip-notebooks``; it takes minutes) executes each
source notebook with nbclient and grades it with ``cs-helpers grade`` (the whole
autograding of one submission: the sandboxed kernel, the trusted scoring), one after
the other, and reports grade / execute per notebook.

The per-topic modules (``cam.py``, ``adversarial.py``, ``synthesis.py``, ``tcav.py``) hold
the peers' and minima's code; this driver reuses them. ``--quick`` samples each
function once (a smoke test, not a measurement). The table goes to ``--out`` and stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))



def _sibling(name):
    """benchmarks/<name>.py as a module named ``_bench_<name>`` (no clash with anything
    else called ``cam`` or ``tcav`` when the driver runs inside another process)."""
    import importlib.util

    module_name = f"_bench_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, Path(__file__).resolve().parent / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


adversarial_bench, cam_bench = _sibling("adversarial"), _sibling("cam")
synthesis_bench, tcav_bench = _sibling("synthesis"), _sibling("tcav")

DEVICE = torch.device("cpu")
MODEL_NAMES = {"toynet": "toynet", "lite0": "efficientnet_lite0"}


@dataclasses.dataclass
class Row:
    topic: str
    method: str
    case: str
    ours: float
    peer_name: str = ""
    peer: float | None = None
    minimum: float | None = None
    note: str = ""
    samples: int = 0


@dataclasses.dataclass
class Case:
    """One measurement: ``ours``, any number of named peers and an optional minimum,
    sampled alternately. One table row per peer (one row without a peer)."""
    topic: str
    method: str
    case: str
    ours: object
    peers: dict = dataclasses.field(default_factory=dict)
    minimum: object = None
    notes: dict = dataclasses.field(default_factory=dict)   # peer name (or "") -> note
    check: object = None  # optional callable returning {peer name: note} after the timing


# ----------------------------------------------------------------------------- timing

def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _clock(fn) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def alternate(functions: dict, repeat: int, budget_s: float, min_repeat: int) -> tuple[dict, int]:
    """Median seconds of each function, sampled in turn (a, b, c, a, b, c, ...) after one
    warm-up call each. The number of rounds is ``repeat``, fewer (down to
    ``min_repeat``) when one round takes more than ``budget_s / repeat``."""
    if repeat == 1 and min_repeat == 1:  # --quick: one sample each, no warm-up
        return {name: _clock(fn) for name, fn in functions.items()}, 1
    round_s = sum(_clock(fn) for fn in functions.values())
    rounds = max(min_repeat, min(repeat, int(budget_s / max(round_s, 1e-9))))
    samples = {name: [] for name in functions}
    for _ in range(rounds):
        for name, fn in functions.items():
            samples[name].append(_clock(fn))
    return {name: statistics.median(values) for name, values in samples.items()}, rounds


def measure(case: Case, settings) -> list[Row]:
    functions = {"ours": case.ours, **{f"peer:{k}": v for k, v in case.peers.items()}}
    if case.minimum is not None:
        functions["minimum"] = case.minimum
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times, rounds = alternate(functions, settings.repeat, settings.budget_s, settings.min_repeat)
        extra = case.check() if case.check is not None else {}
    notes = {**case.notes}
    for key, value in extra.items():
        notes[key] = "; ".join(n for n in (notes.get(key, ""), value) if n)
    rows = []
    for peer in list(case.peers) or [""]:
        note = "; ".join(n for n in (notes.get(peer, ""), notes.get("*", "")) if n)
        rows.append(Row(case.topic, case.method, case.case, times["ours"], peer,
                        times.get(f"peer:{peer}"), times.get("minimum"), note, rounds))
    return rows


def _max_diff(a, b) -> float:
    return float((a.detach().double().cpu() - b.detach().double().cpu()).abs().max())


def _agree(a, b, what="same result", tol=1e-4) -> str:
    diff = _max_diff(a, b)
    return f"{what} (max diff {diff:.1g})" if diff <= tol else f"results differ (max diff {diff:.2g})"


def _share_equal(a, b, tol=1e-5) -> str:
    """For iterated methods, where a gradient's sign may flip between implementations
    at a pixel whose gradient is about zero: the share of equal entries."""
    same = float(((a.detach().double() - b.detach().double()).abs() <= tol).double().mean())
    return f"{100 * same:.2f}% of pixels equal"


# ------------------------------------------------------------------------------ inputs

class Inputs:
    """The models and inputs every case shares: ToyNet with ToyWorld scenes (64 px),
    EfficientNet-Lite0 with seeded random images (224 px); targets are the classes the
    model predicts."""

    def __init__(self, names):
        from cs_helpers.models import load_model
        from cs_helpers.toyworld import toyworld

        self.models, self.images, self.targets, self.layers = {}, {}, {}, {}
        for key in names:
            model = load_model(MODEL_NAMES[key], device=DEVICE)
            if key == "toynet":
                images = toyworld(16, seed=0).images
                self.layers[key] = {"cam": "relu3", "dream": "relu2", "features": "pool", "tcav": "relu2"}
            else:
                images = torch.rand(16, 3, 224, 224, generator=torch.Generator().manual_seed(0))
                self.layers[key] = {"cam": "head", "dream": "blocks.5", "features": "pool", "tcav": "blocks.8"}
            images = images.to(DEVICE)
            with torch.no_grad():
                targets = model(images).argmax(1)
            self.models[key], self.images[key], self.targets[key] = model, images, targets


def _batches(settings):
    return (1, 16) if not settings.quick else (2,)


# ------------------------------------------------------------------ minimum passes

def forward_backward(model, images, targets):
    """One forward and one backward pass of the batch: the target logits' sum, its
    gradient with respect to the input."""
    return cam_bench.forward_backward(model, images, targets)


def forwards(model, batch, count):
    """``count`` forward passes of ``batch`` under no_grad (a batched method's floor)."""
    with torch.no_grad():
        for _ in range(count):
            model(batch)


# ---------------------------------------------------------------------- filters, features

def cases_filters(inputs, settings):
    from cs_helpers.reference.filters import conv2d_im2col

    g = torch.Generator().manual_seed(1)
    shapes = [("16x16x32x32, 3x3 16->32 p1", (16, 16, 32, 32, 32, 3, 1, 1))]
    if not settings.quick:
        shapes.append(("16x3x224x224, 3x3 3->32 s2 (Lite0 stem)", (16, 3, 224, 224, 32, 3, 2, 1)))
    for label, (n, c, h, w, co, k, s, p) in shapes:
        x = torch.randn(n, c, h, w, generator=g).to(DEVICE)
        weight = torch.randn(co, c, k, k, generator=g).to(DEVICE)
        yield Case("filters", "conv2d_im2col", label,
                   lambda x=x, weight=weight, s=s, p=p: conv2d_im2col(x, weight, stride=s, padding=p),
                   {"F.conv2d": lambda x=x, weight=weight, s=s, p=p: F.conv2d(x, weight, stride=s, padding=p)},
                   notes={"F.conv2d": "im2col materializes the patch matrix (C*k*k x L per image); "
                                      "cuDNN/oneDNN convolve without it: the notebook's point is the "
                                      "matrix form, so it cannot match the fused kernel"})


def cases_features(inputs, settings):
    from cs_helpers.reference.features import extract_features, nearest_neighbors, pca

    for key, model in inputs.models.items():
        images = inputs.images[key]
        layer = inputs.layers[key]["features"]
        yield Case("features", "extract_features", f"{key} {layer}, batch {len(images)}",
                   lambda m=model, x=images, layer=layer: extract_features(m, layer, x),
                   minimum=lambda m=model, x=images: forwards(m, x, 1),
                   notes={"": "minimum: one no-grad forward pass of the batch"})
    g = torch.Generator().manual_seed(2)
    for dim in (64,) if settings.quick else (64, 1280):
        database = torch.randn(512, dim, generator=g).to(DEVICE)
        queries = torch.randn(16, dim, generator=g).to(DEVICE)
        yield Case("features", "nearest_neighbors", f"16 queries, 512 x {dim}, k=5",
                   lambda q=queries, x=database: nearest_neighbors(q, x, 5),
                   {"torch.cdist+topk": lambda q=queries, x=database: torch.cdist(
                       q.double(), x.double(), compute_mode="donot_use_mm_for_euclid_dist").topk(5, largest=False)},
                   notes={"*": "both float64 from the differences (no expansion of the square); ours writes the "
                                "differences block by block (512 KiB, in place) and sums their squares, so that "
                                "the squared distances, exact ties and the stable order are the contract's; "
                                "cdist fuses the three passes and returns square roots (which can merge distinct "
                                "squared distances): the exactness costs the extra passes"})
        from sklearn.decomposition import PCA

        def sk_pca(x=database):
            PCA(n_components=8, svd_solver="full").fit_transform(x.cpu().double().numpy())

        def svd_only(x=database):
            x = x.double()
            torch.linalg.svd(x - x.mean(0, keepdim=True), full_matrices=False)

        yield Case("features", "pca", f"512 x {dim}, k=8", lambda x=database: pca(x, 8),
                   {"sklearn PCA(full)": sk_pca}, minimum=svd_only,
                   notes={"": "minimum: the thin SVD of the centred float64 features (torch.linalg.svd)",
                          "sklearn PCA(full)": "SciPy's LAPACK SVD, which scikit-learn calls, can be faster "
                                               "than torch's: ours / min is what ours adds to the SVD"})


# -------------------------------------------------------------------------------- saliency

def cases_saliency(inputs, settings):
    import captum.attr as attr

    from cs_helpers.reference.saliency import _positions, gradient_saliency, guided_backprop, occlusion_map, \
        shapley_values

    for key, model in inputs.models.items():
        for n in _batches(settings):
            x, t = inputs.images[key][:n], inputs.targets[key][:n]
            label = f"{key}, batch {n}"
            fb = lambda m=model, x=x, t=t: forward_backward(m, x, t)  # noqa: E731
            ours = lambda m=model, x=x, t=t: gradient_saliency(m, x, t)  # noqa: E731
            peer = lambda m=model, x=x, t=t: attr.Saliency(m).attribute(  # noqa: E731
                x.clone().requires_grad_(True), target=t, abs=True).amax(1)
            yield Case("saliency", "gradient_saliency", label, ours, {"Captum Saliency": peer}, fb,
                       check=lambda ours=ours, peer=peer: {"Captum Saliency": _agree(ours(), peer())})
            ours = lambda m=model, x=x, t=t: guided_backprop(m, x, t)  # noqa: E731
            peer = lambda m=model, x=x, t=t: attr.GuidedBackprop(m).attribute(  # noqa: E731
                x.clone().requires_grad_(True), target=t)
            if key == "toynet":
                check = lambda ours=ours, peer=peer: {"Captum GuidedBackprop": _agree(ours(), peer())}  # noqa: E731
                notes = {}
            else:
                check = None
                notes = {"Captum GuidedBackprop": "Lite0's activations are ReLU6, which Captum does not "
                                                  "hook: the peer computes less (not the same map)",
                         "*": "ours applies the rule at all 33 ReLU6 through full backward hooks (an autograd "
                              "node each): a fixed cost per call, visible at batch 1"}
            yield Case("saliency", "guided_backprop", label, ours, {"Captum GuidedBackprop": peer}, fb,
                       notes=notes, check=check)

        image, target = inputs.images[key][0], int(inputs.targets[key][0])
        size = image.shape[-1]
        window, stride = (8, 4) if key == "toynet" else (56, 28)
        if settings.quick:
            window, stride = 2 * window, 2 * stride
        batch = 16
        positions = len(_positions(size, window, stride)) ** 2
        softmaxed = lambda x, m=model: m(x).softmax(1)  # noqa: E731
        ours = lambda m=model, i=image, t=target, w=window, s=stride: occlusion_map(  # noqa: E731
            m, i, t, window=w, stride=s, batch_size=batch)
        peer = lambda i=image, t=target, w=window, s=stride, f=softmaxed: attr.Occlusion(f).attribute(  # noqa: E731
            i[None], target=t, sliding_window_shapes=(3, w, w), strides=(3, s, s), baselines=0.5,
            perturbations_per_eval=batch)[0, 0]
        occluded = image[None].repeat(batch, 1, 1, 1)

        def floor(m=model, b=occluded, p=positions, i=image):
            forwards(m, i[None], 1)
            forwards(m, b, math.ceil(p / batch))

        yield Case("saliency", "occlusion_map", f"{key}, {positions} windows {window}/{stride}, batches of {batch}",
                   ours, {"Captum Occlusion": peer}, floor,
                   notes={"": f"minimum: 1 + ceil({positions}/{batch}) forward passes of {batch} images "
                              "(one pre-built batch, no masking)"},
                   check=lambda ours=ours, peer=peer: {"Captum Occlusion": _agree(ours(), peer())})

        grid = 4
        cell = size // grid
        rows = torch.arange(size, device=DEVICE) // cell
        segments = (rows[:, None] * grid + rows[None, :]).clamp(max=grid * grid - 1)
        perms = 3 if key == "toynet" else 2
        ours = lambda m=model, i=image, t=target, s=segments, p=perms: shapley_values(  # noqa: E731
            m, i, t, s, p, batch_size=batch)

        def peer(i=image, t=target, s=segments, p=perms, f=softmaxed):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # Captum draws torch.randperm from the global generator: the same orders
                return attr.ShapleyValueSampling(f).attribute(
                    i[None], target=t, baselines=0.5, feature_mask=s[None, None], n_samples=p,
                    perturbations_per_eval=batch)[0, 0]

        m_segments = grid * grid
        distinct = _distinct_coalitions(m_segments, perms)
        yield Case("saliency", "shapley_values",
                   f"{key}, {m_segments} segments, {perms} permutations, batches of {batch}",
                   ours, {"Captum ShapleyValueSampling": peer},
                   lambda m=model, b=occluded, d=distinct: forwards(m, b, math.ceil(d / batch)),
                   notes={"": f"minimum: ceil({distinct}/{batch}) forward passes ({distinct} distinct coalitions) "
                              f"of one pre-built batch; ours also builds each masked batch; Captum evaluates "
                              f"{perms} x {m_segments} + 1"},
                   check=lambda ours=ours, peer=peer, s=segments: {
                       "Captum ShapleyValueSampling": _agree(ours()[s], peer(), "same values, same orders")})


def _distinct_coalitions(m, n_perm, seed=0):
    g = torch.Generator().manual_seed(seed)
    prefixes = set()
    for _ in range(n_perm):
        order = torch.randperm(m, generator=g).tolist()
        for k in range(m + 1):
            prefixes.add(frozenset(order[:k]))
    return len(prefixes)


# ---------------------------------------------------------------------------------- CAM

def cases_cam(inputs, settings):
    import pytorch_grad_cam  # noqa: F401  (imported here, not in the first timed call)
    from captum.attr import GuidedGradCam

    from cs_helpers.reference.cam import grad_cam, guided_grad_cam

    for key, model in inputs.models.items():
        layer = inputs.layers[key]["cam"]
        for n in _batches(settings):
            x, t = inputs.images[key][:n], inputs.targets[key][:n]
            label = f"{key} {layer}, batch {n}"
            fb = lambda m=model, x=x, t=t: forward_backward(m, x, t)  # noqa: E731
            ours = lambda m=model, x=x, t=t, layer=layer: grad_cam(m, layer, x, t)  # noqa: E731
            captum = lambda m=model, x=x, t=t, layer=layer: cam_bench.captum_grad_cam(m, layer, x, t)  # noqa: E731
            pgc = lambda m=model, x=x, t=t, layer=layer: cam_bench.pytorch_grad_cam(m, layer, x, t)  # noqa: E731
            yield Case("cam", "grad_cam", label, ours,
                       {"Captum LayerGradCam": captum, "pytorch-grad-cam GradCAM": pgc}, fb,
                       notes={"pytorch-grad-cam GradCAM": "also min-max scales and resizes its maps (NumPy)"},
                       check=lambda ours=ours, captum=captum: {"Captum LayerGradCam": _agree(ours(), captum()[:, 0])})
            ours = lambda m=model, x=x, t=t, layer=layer: guided_grad_cam(m, layer, x, t)  # noqa: E731
            peer = lambda m=model, x=x, t=t, layer=layer: GuidedGradCam(  # noqa: E731
                m, m.get_submodule(layer)).attribute(x.clone().requires_grad_(True), target=t)

            def two_passes(m=model, x=x, t=t):
                forward_backward(m, x, t)
                forward_backward(m, x, t)

            yield Case("cam", "guided_grad_cam", label, ours, {"Captum GuidedGradCam": peer}, two_passes,
                       notes={"": "minimum: two forward-backward passes",
                              "Captum GuidedGradCam": "does not min-max scale the upsampled map"
                              + ("; hooks ReLU only (Lite0: ReLU6)" if key == "lite0" else "")})


# -------------------------------------------------------------------------- adversarial

def cases_adversarial(inputs, settings):
    import torchattacks

    from cs_helpers.reference.adversarial import fgsm, pgd

    eps, alpha = 8 / 255, 2 / 255
    for key, model in inputs.models.items():
        steps = (10 if key == "toynet" else 3) if not settings.quick else 2
        for n in _batches(settings):
            x, y = inputs.images[key][:n], inputs.targets[key][:n]
            label = f"{key}, batch {n}"
            ta_fgsm = torchattacks.FGSM(model, eps=eps)
            ours = lambda m=model, x=x, y=y: fgsm(m, x, y, eps)  # noqa: E731
            peer = lambda a=ta_fgsm, x=x, y=y: a(x, y)  # noqa: E731
            yield Case("adversarial", "fgsm", label, ours, {"torchattacks FGSM": peer},
                       lambda m=model, x=x, y=y: adversarial_bench.bare_passes(m, x, y, 1),
                       notes={"": "minimum: one forward-backward pass of the cross-entropy"},
                       check=lambda ours=ours, peer=peer: {"torchattacks FGSM": _agree(ours(), peer())})
            ta_pgd = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False)
            ours = lambda m=model, x=x, y=y, s=steps: pgd(m, x, y, eps, alpha, s)  # noqa: E731
            peer = lambda a=ta_pgd, x=x, y=y: a(x, y)  # noqa: E731
            yield Case("adversarial", "pgd", f"{label}, {steps} steps", ours, {"torchattacks PGD": peer},
                       lambda m=model, x=x, y=y, s=steps: adversarial_bench.bare_passes(m, x, y, s),
                       notes={"": f"minimum: {steps} forward-backward passes"},
                       check=lambda ours=ours, peer=peer: {"torchattacks PGD": _share_equal(ours(), peer())})


# ---------------------------------------------------------------------------- synthesis

def cases_synthesis(inputs, settings):
    from cs_helpers.reference.synthesis import class_visualization_step, deepdream_step, total_variation

    for key, model in inputs.models.items():
        for n in _batches(settings):
            img, t = inputs.images[key][:n], int(inputs.targets[key][0])
            yield Case("synthesis", "class_visualization_step", f"{key}, batch {n}",
                       lambda m=model, img=img, t=t: class_visualization_step(img, m, t, 1e-3, 1.0),
                       minimum=lambda m=model, img=img, t=t: synthesis_bench.logit_pass(m, img, t),
                       notes={"": "minimum: one forward-backward pass of the target logit; ours also "
                                  "differentiates the L2 penalty and normalizes the step (elementwise passes)"})
        layer = inputs.layers[key]["dream"]
        img = inputs.images[key][:1]
        yield Case("synthesis", "deepdream_step", f"{key} {layer}, batch 1",
                   lambda m=model, img=img, layer=layer: deepdream_step(img, m, layer, 0.01),
                   minimum=lambda m=model, img=img, layer=layer: synthesis_bench.layer_pass(m, img, layer),
                   notes={"": "minimum: a full forward pass recording the layer, backward from it"})
    side = 64 if settings.quick else 224
    x = torch.rand(16, 3, side, side, generator=torch.Generator().manual_seed(3)).to(DEVICE).requires_grad_(True)
    yield Case("synthesis", "total_variation", f"16x3x{side}x{side}, forward+backward",
               lambda: total_variation(x, 2.0).backward(), minimum=lambda: synthesis_bench.plain_tv(x),
               notes={"": "minimum: a plain squared anisotropic TV and its backward pass; the contract's "
                          "isotropic form adds dx^2 + dy^2 at each pixel before one sum (one pass more than "
                          "two separate sums, which would round differently)"})


# --------------------------------------------------------------------------------- TCAV

def cases_tcav(inputs, settings, folder):
    from sklearn.linear_model import LogisticRegression

    from cs_helpers.reference import tcav as ref
    from cs_helpers.toyworld import concept_images

    for key, model in inputs.models.items():
        layer = "pool2" if settings.quick and key == "toynet" else inputs.layers[key]["tcav"]
        size = inputs.images[key].shape[-1]
        count = 8 if key == "lite0" or settings.quick else 40
        stripes = concept_images("stripes", count, seed=2, size=size).to(DEVICE)
        randoms = [concept_images("random", count, seed=10 + i, size=size).to(DEVICE) for i in range(3)]
        acts = [ref._activations(model, layer, x) for x in [stripes] + randoms]
        cav = ref.train_cav(acts[0], acts[1])
        for n in _batches(settings):
            x, target = inputs.images[key][:n], int(inputs.targets[key][0])
            ours = lambda m=model, x=x, t=target, layer=layer: ref.tcav_score(  # noqa: E731
                ref.directional_derivatives(m, layer, x, t, cav))
            peer = tcav_bench.captum_tcav(model, layer, cav.to(DEVICE), stripes, randoms[0],
                                          tempfile.mkdtemp(dir=folder), model_id=key)
            captum = lambda peer=peer, x=x, t=target: peer(x, t)  # noqa: E731
            t_all = torch.full((n,), target, device=DEVICE)
            yield Case("tcav", "directional_derivatives + tcav_score", f"{key} {layer}, batch {n}", ours,
                       {"Captum TCAV (fixed CAV)": captum},
                       lambda m=model, x=x, t=t_all: forward_backward(m, x, t),
                       notes={"Captum TCAV (fixed CAV)": "both start the graph at the layer (the forward "
                                                         "pass records nothing below it); Captum also reads "
                                                         "its cached concept activations and CAV from disk",
                              "": "minimum: one forward-backward pass"},
                       check=lambda ours=ours, captum=captum: {
                           "Captum TCAV (fixed CAV)": "same score" if ours() == captum() else "scores differ"})
        x64 = [a.double().cpu().numpy() for a in acts]
        import numpy as np

        fit_x = np.concatenate([x64[0], x64[1]])
        fit_y = np.concatenate([np.ones(len(x64[0]), dtype=np.int64), np.zeros(len(x64[1]), dtype=np.int64)])

        def bare_fit(fx=fit_x, fy=fit_y):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                LogisticRegression(random_state=0).fit(fx, fy)

        yield Case("tcav", "train_cav", f"{key} {layer}, {count}+{count} x {acts[0].shape[1]}",
                   lambda a=acts: ref.train_cav(a[0], a[1]), minimum=bare_fit,
                   notes={"": "minimum: scikit-learn's LogisticRegression fit on the same float64 matrix; "
                              "ours also checks and converts the activations"})
        if key != "toynet":
            continue
        targets = inputs.images[key]
        target = int(inputs.targets[key][0])

        def floor(m=model, imgs=targets, t=target, layer=layer, s=stripes, r=randoms):
            forward_backward(m, imgs, torch.full((len(imgs),), t, device=DEVICE))
            sets = [ref._activations(m, layer, z).double().cpu().numpy() for z in [s] + r]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for i in range(len(r)):
                    for a, b in ((sets[0], sets[i + 1]), (sets[i + 1], sets[(i + 1) % len(r) + 1])):
                        LogisticRegression(random_state=0).fit(
                            np.concatenate([a, b]), np.r_[np.ones(len(a)), np.zeros(len(b))])

        yield Case("tcav", "tcav_test", f"{key} {layer}, {len(targets)} targets, 3 random sets of {count}",
                   lambda m=model, imgs=targets, t=target, layer=layer, s=stripes, r=randoms:
                   ref.tcav_test(m, layer, t, imgs, s, r),
                   minimum=floor,
                   notes={"": "minimum: one forward-backward pass, the sets' forward passes, 6 bare fits"})


# ------------------------------------------------------------------------------ notebooks

def bench_notebooks(names=None, progress=None) -> list[dict]:
    """Executes each source notebook and grades it (``cs-helpers grade`` on the same
    file), one after the other: the seconds of each and their ratio. ``progress(rows)``
    is called after each notebook."""
    import nbformat
    from nbclient import NotebookClient

    from cs_helpers.course import source_notebooks

    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    results = []
    for path in source_notebooks():
        if names and not any(n in path.parent.name for n in names):
            continue
        nb = nbformat.read(path, as_version=4)
        old_path = os.environ.get("PATH", "")
        os.environ["PATH"] = env["PATH"]
        start = time.perf_counter()
        status = "ok"
        try:
            NotebookClient(nb, timeout=900, kernel_name="python3",
                           resources={"metadata": {"path": str(path.parent)}}).execute()
        except Exception as exc:  # report and go on
            status = f"execution failed: {type(exc).__name__}"
        finally:
            os.environ["PATH"] = old_path
        execute_s = time.perf_counter() - start
        start = time.perf_counter()
        grade = subprocess.run([str(Path(sys.executable).parent / "cs-helpers"), "grade", "--json", str(path)],
                               capture_output=True, text=True, env=env, cwd=ROOT)
        grade_s = time.perf_counter() - start
        score = ""
        try:
            # The JSON report is the last thing printed (libraries may warn on stdout before it).
            report = json.loads(grade.stdout[grade.stdout.rindex('{\n  "notebooks"'):])["notebooks"][0]
            score = (f"{report['score']:g} / {report['max_score']:g}" if "error" not in report
                     else f"not graded: {report['error']}")
        except (ValueError, KeyError, IndexError):  # ValueError: no JSON report
            score = f"grade failed (exit {grade.returncode}): {(grade.stderr or grade.stdout).strip()[-200:]}"
        results.append({"notebook": f"{path.parent.name}/{path.name}", "execute_s": execute_s,
                        "grade_s": grade_s, "score": score, "status": status})
        print(f"  {path.parent.name}: execute {execute_s:.1f} s, grade {grade_s:.1f} s ({score})",
              file=sys.stderr, flush=True)
        if progress is not None:
            progress(results)
    return results


# ---------------------------------------------------------------------------------- table

def _s(value) -> str:
    if value is None:
        return "—"
    return f"{value:.3g}" if value >= 0.001 else f"{value * 1e6:.0f}µ"


def _ratio(a, b) -> str:
    if b is None or b <= 0:
        return "—"
    return f"{a / b:.2f}" if a / b >= 0.01 else f"{a / b:.1g}"


def render(rows: list[Row], notebooks: list[dict] | None, header: str) -> str:
    lines = [header, "",
             "Seconds are medians of alternate samples (ours, peer(s), minimum in turn); ratios below 1 mean "
             "ours is faster. Budget: ours/peer <= 1, ours/min <= 1.15. n: rounds sampled (3 for the slow "
             "cases): on a shared machine, ratios within about 15% of 1 are within the noise.", "",
             "| topic | method | case | ours s | peer | peer s | min s | ours/peer | ours/min | n | notes |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.topic} | {r.method} | {r.case} | {_s(r.ours)} | {r.peer_name or '—'} | {_s(r.peer)} | "
                     f"{_s(r.minimum)} | {_ratio(r.ours, r.peer)} | {_ratio(r.ours, r.minimum)} | {r.samples} | "
                     f"{r.note.replace('|', '/')} |")
    lines += ["", "Not timed (microseconds, no peer or floor worth measuring): normalize_filters, linear_templates, "
              "im2col alone, receptive_field, top_activating_patches, class_activation_map, upsample_cam, "
              "pointing_game, clip_small_values, clip_small_contributions, feature_inversion_loss; "
              "make_fooling_image, universal_perturbation and fooling_rate are loops of the passes timed above."]
    if notebooks is not None:
        lines += ["", "Notebooks: execution (nbclient, top to bottom) and autograding of one full submission "
                  "(`cs-helpers grade` on the source notebook: sandboxed kernel plus trusted scoring), "
                  "measured one after the other. Budget: grade/execute <= 1.5.", "",
                  "| notebook | execute s | grade s | grade/execute | score | status |", "|---|---|---|---|---|---|"]
        for n in notebooks:
            lines.append(f"| {n['notebook']} | {n['execute_s']:.1f} | {n['grade_s']:.1f} | "
                         f"{n['grade_s'] / n['execute_s']:.2f} | {n['score']} | {n['status']} |")
    return "\n".join(lines) + "\n"


TOPICS = {"filters": cases_filters, "features": cases_features, "saliency": cases_saliency, "cam": cases_cam,
          "adversarial": cases_adversarial, "synthesis": cases_synthesis, "tcav": cases_tcav}


def main(argv=None) -> int:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one sample per function (smoke test)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--models", default="toynet,lite0", help="comma-separated: toynet, lite0")
    parser.add_argument("--topics", default=",".join(TOPICS), help="comma-separated topics to time")
    parser.add_argument("--repeat", type=int, default=7, help="rounds per case (fewer for slow cases)")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of sampling per case, about")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's, from OMP_NUM_THREADS)")
    parser.add_argument("--skip-notebooks", action="store_true", help="leave out executing and grading notebooks")
    parser.add_argument("--notebooks", default="", help="only these notebooks (comma-separated name parts)")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench.md")
    args = parser.parse_args(argv)
    DEVICE = torch.device(args.device)
    cam_bench.DEVICE = synthesis_bench.DEVICE = DEVICE
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODEL_NAMES))
    if unknown:
        parser.error(f"unknown models {unknown}; expected some of {sorted(MODEL_NAMES)}")
    topics = [t.strip() for t in args.topics.split(",") if t.strip()]
    if set(topics) - set(TOPICS):
        parser.error(f"unknown topics {sorted(set(topics) - set(TOPICS))}; expected some of {list(TOPICS)}")
    settings = argparse.Namespace(quick=args.quick, repeat=1 if args.quick else args.repeat,
                                  min_repeat=1 if args.quick else 3, budget_s=args.budget)
    device_name = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else platform.processor() or "cpu"
    header = (f"# Benchmark ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n"
              f"torch {torch.__version__}, device {DEVICE.type} ({device_name}), {torch.get_num_threads()} "
              f"torch threads, {os.cpu_count()} CPUs; models: {', '.join(models)}"
              + ("; --quick: one sample each, not a measurement" if args.quick else ""))
    torch.manual_seed(0)
    inputs = Inputs(models)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="cs-bench-") as folder:
        for topic in topics:
            maker = TOPICS[topic]
            cases = maker(inputs, settings, folder) if topic == "tcav" else maker(inputs, settings)
            for case in cases:
                start = time.perf_counter()
                new = measure(case, settings)
                rows += new
                print(f"  {case.topic} {case.method} [{case.case}]: ours {_s(new[0].ours)} s "
                      f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Written as it goes (the notebook section takes minutes): an interrupted run keeps
    # what it measured.
    args.out.write_text(render(rows, None if args.skip_notebooks else [], header), encoding="utf-8")
    notebooks = None
    if not args.skip_notebooks:
        notebooks = bench_notebooks([n for n in args.notebooks.split(",") if n],
                                    lambda done: args.out.write_text(render(rows, done, header), encoding="utf-8"))
    text = render(rows, notebooks, header)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    print(f"(written to {args.out})")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
