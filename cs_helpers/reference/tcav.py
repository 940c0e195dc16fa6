"""Notebook 07 (TCAV): does a network use a human concept for a class?

Testing with Concept Activation Vectors (Kim, Wattenberg, Gilmer, Cai, Wexler, Viegas &
Sayres 2018, "Interpretability Beyond Feature Attribution: Quantitative Testing with
Concept Activation Vectors (TCAV)", ICML):

* **train_cav**: a linear classifier separates a layer's activations on images of a
  concept ("stripes") from its activations on random images; the normal of its decision
  boundary, pointing toward the concept, is the concept activation vector (CAV).
* **directional_derivatives**: how the class score changes when the layer's activation
  moves along the CAV, ``(dS_target / dA_flat) . cav``, for each image of the class.
* **tcav_score**: the fraction of the class's images whose directional derivative is
  strictly positive.
* **tcav_test**: the score against several random sets, compared by a two-sided t-test
  with the scores of CAVs trained on random-versus-random sets (what a meaningless
  direction scores).

The linear classifier is scikit-learn's ``LogisticRegression`` with its default
settings and the test SciPy's ``ttest_ind``; neither is rewritten here.

Every function that takes a model leaves its inputs, the model's mode and its parameters
as they were, removes every hook it registers (also when it raises), and works on the
model's device. The private ``_..._variant`` helpers compute what common mistakes compute
(the derivative of the probability, the activation at the layer's input, ...); the
grader uses them to tell a student which property went wrong. They are not part of the
contract.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from ..hooks import capture, get_layer, model_device
from ._inputs import check_batch, check_model, single_target

__all__ = ["directional_derivatives", "tcav_score", "tcav_test", "train_cav"]

_CHUNK = 32  # images per forward pass inside tcav_test (bounds memory on large models)


# ----------------------------------------------------------------------------- inputs

def _as_matrix(acts, what) -> np.ndarray:
    """Activations ``(n, D)`` (tensor or array) as a float64 NumPy matrix."""
    if isinstance(acts, torch.Tensor):
        acts = acts.detach().to("cpu", torch.float64).numpy()
    acts = np.asarray(acts, dtype=np.float64)
    if acts.ndim != 2:
        raise ValueError(f"{what} must be a matrix (n, D) of flattened activations; got shape {acts.shape}")
    if acts.shape[0] < 1:
        raise ValueError(f"{what} holds no activations")
    if not np.isfinite(acts).all():
        raise ValueError(f"{what} holds NaN or infinite values")
    return acts


# ------------------------------------------------------------------------- train_cav

def _one_blas_thread():
    """One BLAS thread for the duration of a fit. The fits are a few dozen rows: each
    lbfgs step is a handful of matrix-vector products, where a second OpenBLAS thread
    only adds synchronization; on a busy 2-core machine it made a fit 15 times slower
    (3.1 s instead of 0.19 s for 40 x 32768 activations). The result is the same."""
    global _BLAS_CONTROLLER
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        import contextlib

        return contextlib.nullcontext()
    # Finding the loaded BLAS libraries takes about 20 ms (a scan of the process's
    # libraries): once, after scikit-learn (and so SciPy's BLAS) is imported.
    if _BLAS_CONTROLLER is None:
        _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER.limit(limits=1, user_api="blas")


_BLAS_CONTROLLER = None


def train_cav(concept_acts, random_acts, seed: int = 0) -> torch.Tensor:
    """Concept activation vector (Kim et al. 2018).

    Fits scikit-learn's ``LogisticRegression(random_state=seed)`` with its default
    settings (L2 penalty, ``C=1``, lbfgs, an intercept; no standardization and no
    train/test split) on the activations, the concept's as class 1 and the random ones
    as class 0, and returns the normal of its decision boundary (``coef_``) scaled to
    unit length: it points from the random activations toward the concept's.

    Parameters
    ----------
    concept_acts : Tensor or array ``(n_c, D)``, the layer's flattened activations on
        the concept images.
    random_acts : Tensor or array ``(n_r, D)``, the same on random images.
    seed : int, ``random_state`` of the classifier (lbfgs does not draw random numbers,
        so the result does not depend on it; other solvers would).

    Returns
    -------
    FloatTensor ``(D,)`` of unit Euclidean norm, on the device of ``concept_acts`` when
    it is a tensor (else the CPU). Deterministic: the global random state is neither
    used nor changed. The activations are fitted in float64.
    """
    from sklearn.linear_model import LogisticRegression

    concept = _as_matrix(concept_acts, "concept_acts")
    random = _as_matrix(random_acts, "random_acts")
    if concept.shape[1] != random.shape[1]:
        raise ValueError(f"concept_acts and random_acts must have the same number of features; "
                         f"got {concept.shape[1]} and {random.shape[1]}")
    x = np.concatenate([concept, random])
    y = np.concatenate([np.ones(len(concept), dtype=np.int64), np.zeros(len(random), dtype=np.int64)])
    classifier = LogisticRegression(random_state=int(seed))
    with warnings.catch_warnings(), _one_blas_thread():
        warnings.simplefilter("ignore")  # lbfgs may stop at max_iter on separable data; the direction is fine
        classifier.fit(x, y)
    normal = classifier.coef_[0]
    norm = float(np.linalg.norm(normal))
    if not norm > 0:
        raise ValueError("the classifier found no direction: the concept and random activations are identical")
    device = concept_acts.device if isinstance(concept_acts, torch.Tensor) else torch.device("cpu")
    return torch.from_numpy(normal / norm).to(device=device, dtype=torch.float32)


# ----------------------------------------------------------- directional_derivatives

def _layer_gradients(model, layer, images, target, score: str = "logit", where: str = "output",
                     chunk: int | None = None) -> torch.Tensor:
    """``dscore_target / dA_flat`` per image, ``(N, D)``, with ``A`` the output of
    ``layer`` (``where="output"``, the contract) or its input (``where="input"``: a
    mistake the grader recognizes); ``score`` is ``"logit"`` (the contract), ``"prob"``
    or ``"logprob"``. One backward pass per chunk of images."""
    check_model(model)
    check_batch(images)
    module = get_layer(model, layer)
    t = single_target(target)
    device = model_device(model)
    images = images.detach().to(device)
    chunk = images.shape[0] if chunk is None else chunk
    grads = []
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk]
        with torch.enable_grad():
            if where == "output":
                # The graph starts at the layer: its output becomes a leaf that requires
                # grad (the images do not), so the forward pass records nothing below it;
                # the layers above use a copy, which in-place activations may overwrite.
                seen = {}

                def leaf(_module, _args, output):
                    if not isinstance(output, torch.Tensor):
                        raise TypeError(f"layer {layer!r} returns {type(output).__name__}, not a tensor")
                    if not output.requires_grad:
                        output.requires_grad_(True)
                    seen["output"] = output
                    return output.clone()

                handle = module.register_forward_hook(leaf)
                try:
                    logits = model(x)
                finally:
                    handle.remove()
                act = seen.get("output")
            else:
                x = x.clone().requires_grad_(True)
                seen = {}

                def pre(_module, args):
                    seen["input"] = args[0]

                handle = module.register_forward_pre_hook(pre)
                try:
                    logits = model(x)
                finally:
                    handle.remove()
                act = seen.get("input")
            if act is None:
                raise ValueError(f"layer {layer!r} was not used in the forward pass")
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                raise ValueError("the model must return logits (N, num_classes)")
            if not 0 <= t < logits.shape[1]:
                raise ValueError(f"target must lie in [0, {logits.shape[1] - 1}]; got {t}")
            if score == "prob":
                logits = logits.softmax(dim=1)
            elif score == "logprob":
                logits = logits.log_softmax(dim=1)
            # Image i's score depends on image i's activation only (eval mode), so the
            # gradient of the sum holds every image's own gradient.
            (grad,) = torch.autograd.grad(logits[:, t].sum(), act)
        grads.append(grad.detach().flatten(1))
    return torch.cat(grads)


def _project(grads: torch.Tensor, cav) -> torch.Tensor:
    if not isinstance(cav, torch.Tensor):
        cav = torch.as_tensor(np.asarray(cav))
    cav = cav.detach().flatten()
    if cav.numel() != grads.shape[1]:
        raise ValueError(f"the CAV has {cav.numel()} entries but the layer's flattened activation has "
                         f"{grads.shape[1]}")
    return grads @ cav.to(device=grads.device, dtype=grads.dtype)


def directional_derivatives(model: nn.Module, layer, images: torch.Tensor, target, cav) -> torch.Tensor:
    """Directional derivatives of the class score along a CAV (Kim et al. 2018).

    ``D[n] = (dS_target(images[n]) / dA_flat) . cav``, with ``S_target`` the target's
    *logit* (not its softmax probability) and ``A_flat`` the flattened *output* of the
    module named ``layer``: the rate at which the score grows when the activation moves
    along the CAV.

    Parameters
    ----------
    model : nn.Module mapping ``(N, 3, H, W)`` in ``[0, 1]`` to logits ``(N, C)``.
    layer : dotted module name (or the module itself).
    images : Tensor ``(N, 3, H, W)`` in ``[0, 1]``.
    target : int, one class for the whole batch.
    cav : Tensor ``(D,)``, ``D`` the size of the layer's output for one image.

    Returns
    -------
    Tensor ``(N,)`` in the dtype of the layer's activations, detached, on the model's
    device; the whole batch costs one forward and one backward pass.
    """
    return _project(_layer_gradients(model, layer, images, target), cav)


def _directional_variant(model, layer, images, target, cav, score="logit", where="output"):
    """What a mistake computes: the derivative of the probability or log-probability,
    or the activation taken at the layer's input."""
    return _project(_layer_gradients(model, layer, images, target, score=score, where=where), cav)


# ------------------------------------------------------------------------ tcav_score

def _as_vector(derivatives) -> torch.Tensor:
    if not isinstance(derivatives, torch.Tensor):
        derivatives = torch.as_tensor(np.asarray(derivatives, dtype=np.float64))
    derivatives = derivatives.detach().flatten()
    if derivatives.numel() == 0:
        raise ValueError("tcav_score needs at least one directional derivative")
    return derivatives


def tcav_score(derivatives) -> float:
    """TCAV score (Kim et al. 2018): the fraction of the class's images whose
    directional derivative is **strictly** positive (a zero derivative is not evidence
    for the concept). Only signs count, never magnitudes.

    ``derivatives``: Tensor (or array) ``(N,)``. Returns a Python ``float`` in ``[0, 1]``.
    """
    d = _as_vector(derivatives)
    return float((d > 0).sum().item()) / d.numel()


def _score_variant(derivatives, rule="magnitude"):
    """Mistakes: ``"magnitude"`` (positive mass over total mass), ``"nonnegative"``
    (``>= 0``)."""
    d = _as_vector(derivatives).double()
    if rule == "nonnegative":
        return float((d >= 0).double().mean())
    total = float(d.abs().sum())
    return float(d.clamp(min=0).sum()) / total if total > 0 else 0.0


# ------------------------------------------------------------------------- tcav_test

@torch.no_grad()
def _activations(model, layer, images) -> torch.Tensor:
    check_batch(images, "images")
    device = model_device(model)
    out = []
    for start in range(0, images.shape[0], _CHUNK):
        with capture(model, layer) as record:
            model(images[start:start + _CHUNK].detach().to(device))
        if record.output is None:
            raise ValueError(f"layer {layer!r} was not used in the forward pass")
        out.append(record.output.detach().flatten(1))
    return torch.cat(out)


def _t_test(scores, random_scores) -> float:
    from scipy.stats import ttest_ind

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant lists: SciPy warns and returns NaN
        return float(ttest_ind(scores, random_scores).pvalue)


def tcav_test(model: nn.Module, layer, target, target_images: torch.Tensor, concept_images: torch.Tensor,
              random_image_sets, seed: int = 0) -> dict:
    """TCAV with its statistical test (Kim et al. 2018).

    With ``R = len(random_image_sets)`` (at least 3):

    * ``scores[i]``: TCAV score of the CAV trained (:func:`train_cav`, ``seed``) on the
      concept's activations against random set ``i``'s, on ``target_images``;
    * ``random_scores[i]``: TCAV score of the CAV trained on random set ``i`` (as the
      "concept") against random set ``(i + 1) % R``: what a direction without meaning
      scores;
    * ``score``: the mean of ``scores``;
    * ``p_value``: ``scipy.stats.ttest_ind(scores, random_scores).pvalue``, a two-sided
      Student t-test (equal variances), NaN when both lists are constant;
    * ``significant``: ``p_value < 0.05`` (False when NaN).

    Parameters
    ----------
    model, layer, target : as for :func:`directional_derivatives`.
    target_images : Tensor ``(N, 3, H, W)``, images of the class ``target``.
    concept_images : Tensor ``(n_c, 3, H', W')``, images of the concept.
    random_image_sets : sequence of ``R >= 3`` tensors ``(n_i, 3, H', W')``.
    seed : int, the seed of every CAV.

    Returns
    -------
    dict with ``scores`` and ``random_scores`` (lists of ``R`` floats), ``score`` and
    ``p_value`` (floats), ``significant`` (bool). Raises ``ValueError`` with fewer than
    three random sets. Activations are read in forward passes of at most 32 images; the
    gradients of the target images are computed once and projected on every CAV.
    """
    check_model(model)
    if isinstance(random_image_sets, torch.Tensor) and random_image_sets.dim() == 4:
        raise TypeError("random_image_sets must be a list of image batches (one tensor (n, 3, H, W) per set), "
                        "not one batch")
    sets = list(random_image_sets)
    if len(sets) < 3:
        raise ValueError(f"tcav_test needs at least 3 random sets to estimate the spread of random CAVs; "
                         f"got {len(sets)}")
    check_batch(target_images, "target_images")
    check_batch(concept_images, "concept_images")
    for i, images in enumerate(sets):
        check_batch(images, f"random_image_sets[{i}]")
    grads = _layer_gradients(model, layer, target_images, target, chunk=_CHUNK)
    concept = _activations(model, layer, concept_images)
    randoms = [_activations(model, layer, images) for images in sets]
    r = len(sets)

    def score_of(positive, negative):
        return tcav_score(_project(grads, train_cav(positive, negative, seed=seed)))

    scores = [score_of(concept, randoms[i]) for i in range(r)]
    random_scores = [score_of(randoms[i], randoms[(i + 1) % r]) for i in range(r)]
    p_value = _t_test(scores, random_scores)
    return {
        "scores": scores,
        "score": float(np.mean(scores)),
        "random_scores": random_scores,
        "p_value": p_value,
        "significant": bool(p_value < 0.05),
    }
