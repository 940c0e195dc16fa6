"""The TCAV reference against independent implementations (Captum's TCAV with the same
CAV, finite differences in float64, a logistic regression fitted by SciPy's optimizer),
its ground truth on fresh ToyWorld scenes, its determinism, and the checks: the reference
earns full points, each mistake students make loses points through what it returns."""
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from cs_helpers.grading import get_check
from cs_helpers.reference import tcav as ref
from cs_helpers.reference.tcav import directional_derivatives, tcav_score, tcav_test, train_cav
from cs_helpers.toyworld import CLASS_NAMES, concept_images, toyworld
from helpers import grade_in_process, rand

NAMES = ("train_cav", "directional_derivatives", "tcav_score", "tcav_test")


pytestmark = pytest.mark.usefixtures("one_thread")


def scenes(class_name, n, seed):
    world = toyworld(n * 5 + 10, seed=seed)
    return world.images[world.labels == CLASS_NAMES.index(class_name)][:n]


def randoms(count, n, seed):
    return [concept_images("random", n, seed=seed + i) for i in range(count)]


# ----------------------------------------------------------------------- train_cav

def symmetric_activations(direction, n, along, g):
    """Rows t d + m and t d - m (m orthogonal to d): symmetric under the reflection that
    keeps d, so any L2-regularized logistic regression has its normal along d."""
    noise = torch.randn(n // 2, direction.numel(), generator=g, dtype=torch.float64)
    noise -= (noise @ direction)[:, None] * direction
    t = along[0] + (along[1] - along[0]) * torch.rand(n // 2, generator=g, dtype=torch.float64)
    return torch.cat([t[:, None] * direction + noise, t[:, None] * direction - noise]).float()


def test_train_cav_is_a_unit_vector_pointing_toward_the_concept():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(50, generator=g, dtype=torch.float64)
    d /= d.norm()
    concept = symmetric_activations(d, 14, (0.5, 2.0), g)
    random = symmetric_activations(d, 20, (-2.0, 0.0), g)
    cav = train_cav(concept, random)
    assert cav.dtype == torch.float32 and cav.shape == (50,)
    assert abs(float(cav.norm()) - 1) < 1e-6
    assert float(cav.double() @ d) > 0.9999
    # Swapping the roles reverses the vector (logistic regression is symmetric in its labels).
    assert torch.allclose(train_cav(random, concept), -cav, atol=1e-5)


def test_train_cav_is_the_normal_of_an_l2_logistic_regression_fitted_independently():
    from scipy.optimize import minimize

    g = torch.Generator().manual_seed(1)
    concept = torch.randn(15, 12, generator=g) * 2 + 0.4
    random = torch.randn(18, 12, generator=g) * 2
    x = torch.cat([concept, random]).double().numpy()
    y = np.r_[np.ones(15), -np.ones(18)]

    def loss(params):  # scikit-learn's objective: 0.5 |w|^2 + C sum log(1 + exp(-y (w.x + b))), C = 1
        w, b = params[:-1], params[-1]
        margins = y * (x @ w + b)
        grad_m = -y / (1 + np.exp(margins))
        return 0.5 * w @ w + np.logaddexp(0, -margins).sum(), np.r_[w + x.T @ grad_m, grad_m.sum()]

    fit = minimize(loss, np.zeros(13), jac=True, method="BFGS", options={"gtol": 1e-10})
    normal = fit.x[:-1] / np.linalg.norm(fit.x[:-1])
    cav = train_cav(concept, random, seed=0).double().numpy()
    assert float(normal @ cav) > 0.99999


def test_train_cav_and_tcav_test_are_deterministic_whatever_the_global_random_state(toynet):
    concept, random = rand(10, 30, seed=1), rand(12, 30, seed=2)
    target, concept_imgs = scenes("zebra", 6, seed=3), concept_images("stripes", 8, seed=4)
    sets = randoms(3, 8, seed=5)
    results = []
    for global_seed in (0, 123):
        torch.manual_seed(global_seed)
        np.random.seed(global_seed)
        torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
        results.append((train_cav(concept, random, seed=7),
                        tcav_test(toynet, "pool2", 4, target, concept_imgs, sets, seed=7)))
        assert torch.equal(torch.get_rng_state(), torch_state), "the global torch random state changed"
        assert np.random.get_state()[1].tolist() == numpy_state[1].tolist(), "the global NumPy state changed"
    (cav_a, test_a), (cav_b, test_b) = results
    assert torch.equal(cav_a, cav_b)
    assert test_a == test_b


# ---------------------------------------------------------- directional_derivatives

def finite_difference(model, layer, images, target, cav, eps=1e-4):
    """(S(A + eps cav) - S(A - eps cav)) / (2 eps), moving the layer's output with a hook."""
    module = model.get_submodule(layer)
    shift = {"value": 0.0}

    def hook(_module, _inputs, output):
        return output + shift["value"] * cav.view(1, *output.shape[1:])

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            shift["value"] = eps
            up = model(images)[:, target]
            shift["value"] = -eps
            down = model(images)[:, target]
    finally:
        handle.remove()
    return (up - down) / (2 * eps)


# Not relu1 or relu2: a max-pooling window of zeros (dead ReLUs) is a tie, where the network
# has one-sided derivatives only, and a finite difference picks the largest CAV entry.
@pytest.mark.parametrize("layer", ["pool1", "conv2", "pool2", "relu3"])
def test_directional_derivatives_equal_finite_differences_in_float64(layer):
    from cs_helpers.models import load_model

    model = load_model("toynet", device="cpu").double()
    # ToyWorld's flat fills make exact ties inside max-pooling windows, where the network
    # has no derivative; a little noise breaks them.
    world = toyworld(3, seed=11)
    images = (world.images.double() + 0.02 * rand(3, 3, 64, 64, seed=4).double()).clamp(0, 1)
    with torch.no_grad():
        dim = ref._activations(model, layer, images).shape[1]
    cav = torch.randn(dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cav /= cav.norm()
    before = images.clone()
    got = directional_derivatives(model, layer, images, 4, cav)
    assert got.dtype == torch.float64 and got.shape == (3,) and not got.requires_grad
    assert torch.equal(images, before)
    expected = finite_difference(model, layer, images, 4, cav)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-10), (got, expected)


class FixedCav:
    """A Captum Classifier that 'trains' to a given CAV: weights rows (concept, random)."""

    def __init__(self, cav):
        self.cav = cav

    def train_and_eval(self, dataloader, **kwargs):
        return {"accs": torch.tensor(1.0)}

    def weights(self):
        return torch.stack([self.cav, -self.cav])

    def classes(self):
        return [0, 1]


def captum_sign_count(model, layer, images, target, cav, concept_imgs, random_imgs, save_path):
    from captum.concept import TCAV, Concept
    from captum.concept._utils.classifier import Classifier

    classifier = type("FixedCavClassifier", (FixedCav, Classifier), {})(cav)

    def concept(i, name, imgs):
        return Concept(i, name, torch.utils.data.DataLoader(imgs, batch_size=len(imgs)))

    tcav = TCAV(model, [layer], model_id="toynet", classifier=classifier, save_path=str(save_path))
    experiment = [concept(0, "concept", concept_imgs), concept(1, "random", random_imgs)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = tcav.interpret(images, experimental_sets=[experiment], target=target)
    return float(scores["0-1"][layer]["sign_count"][0])


@pytest.mark.parametrize("class_name, concept_name, layer", [("zebra", "stripes", "pool2"),
                                                             ("circle", "dots", "relu2")])
def test_tcav_score_equals_captums_sign_count_for_the_same_cav(toynet, tmp_path, class_name, concept_name, layer):
    images = scenes(class_name, 16, seed=21)
    concept_imgs, random_imgs = concept_images(concept_name, 12, seed=22), concept_images("random", 12, seed=23)
    with torch.no_grad():
        cav = train_cav(ref._activations(toynet, layer, concept_imgs), ref._activations(toynet, layer, random_imgs))
    ours = tcav_score(directional_derivatives(toynet, layer, images, CLASS_NAMES.index(class_name), cav))
    theirs = captum_sign_count(toynet, layer, images, CLASS_NAMES.index(class_name), cav, concept_imgs,
                               random_imgs, tmp_path)
    assert ours == theirs
    # And on a random direction, where the score is far from 0 and 1.
    direction = torch.randn(cav.numel(), generator=torch.Generator().manual_seed(5))
    direction /= direction.norm()
    ours = tcav_score(directional_derivatives(toynet, layer, images, 0, direction))
    assert ours == captum_sign_count(toynet, layer, images, 0, direction, concept_imgs, random_imgs,
                                     tmp_path / "random")


# ------------------------------------------------------------------------ tcav_score

def test_tcav_score_counts_strictly_positive_signs():
    d = torch.tensor([0.01, 0.02, -5.0, 0.0, 0.03])
    assert tcav_score(d) == 0.6 and type(tcav_score(d)) is float
    assert tcav_score(torch.zeros(4)) == 0.0
    assert tcav_score(torch.tensor([-1.0, -2.0])) == 0.0
    assert tcav_score(np.array([1.0, 2.0])) == 1.0
    with pytest.raises(ValueError):
        tcav_score(torch.zeros(0))


# ------------------------------------------------------------------------- tcav_test

def test_tcav_test_composes_the_public_functions_with_the_contracts_pairing(toynet):
    target, concept = scenes("leopard", 10, seed=31), concept_images("dots", 10, seed=32)
    sets = randoms(4, 10, seed=33)
    result = tcav_test(toynet, "pool2", 4, target, concept, sets, seed=3)
    acts = [ref._activations(toynet, "pool2", x) for x in [concept] + sets]

    def score(a, b):
        return tcav_score(directional_derivatives(toynet, "pool2", target, 4, train_cav(a, b, seed=3)))

    scores = [score(acts[0], acts[1 + i]) for i in range(4)]
    random_scores = [score(acts[1 + i], acts[1 + (i + 1) % 4]) for i in range(4)]
    assert result["scores"] == scores and result["random_scores"] == random_scores
    assert result["score"] == pytest.approx(np.mean(scores))
    assert result["p_value"] == pytest.approx(stats.ttest_ind(scores, random_scores).pvalue, nan_ok=True)
    assert result["significant"] is bool(result["p_value"] < 0.05)
    assert all(type(v) is float for v in scores + random_scores)
    assert type(result["score"]) is float and type(result["p_value"]) is float


def test_tcav_test_refuses_fewer_than_three_random_sets(toynet):
    target, concept = scenes("zebra", 4, seed=41), concept_images("stripes", 4, seed=42)
    with pytest.raises(ValueError, match="at least 3"):
        tcav_test(toynet, "pool2", 4, target, concept, randoms(2, 4, seed=43))


def test_p_value_of_constant_lists_is_nan_and_not_significant():
    assert np.isnan(ref._t_test([1.0, 1.0, 1.0], [1.0, 1.0, 1.0]))
    assert not bool(np.nan < 0.05)


def test_ground_truth_on_fresh_toyworld_scenes(toynet):
    """Texture concepts are significant, with high scores, for the texture classes; for a
    shape class they are no positive evidence, and dots are significant evidence against
    it (measured with the committed toynet: circle/stripes 0.41, p = 0.29; circle/dots
    0.0). Random CAVs at pool2 score near 0 or 1, so the test needs many random sets (10)
    to be decisive."""
    sets = randoms(10, 12, seed=500)
    stripes, dots = concept_images("stripes", 12, seed=501), concept_images("dots", 12, seed=502)
    results = {}
    for class_name, concept_name, concept in [("zebra", "stripes", stripes), ("leopard", "dots", dots),
                                              ("circle", "stripes", stripes), ("circle", "dots", dots)]:
        results[class_name, concept_name] = tcav_test(toynet, "pool2", CLASS_NAMES.index(class_name),
                                                      scenes(class_name, 16, seed=503), concept, sets)
    for texture in (("zebra", "stripes"), ("leopard", "dots")):
        assert results[texture]["significant"] and results[texture]["score"] >= 0.9, results[texture]
    for concept in ("stripes", "dots"):
        circle = results["circle", concept]
        assert not (circle["significant"] and circle["score"] > np.mean(circle["random_scores"])), circle
        assert circle["score"] < 0.5, circle
    assert results["circle", "dots"]["significant"] and results["circle", "dots"]["score"] <= 0.2


# --------------------------------------------------------------------- the checks

@pytest.fixture(scope="module")
def graded():
    """Scores functions in this process like ``grading.score`` (tests/helpers.py)."""
    return grade_in_process


@pytest.mark.parametrize("name", NAMES)
def test_the_reference_earns_full_points(graded, name):
    check = get_check(name)
    report = graded(name, check.reference())
    assert report.score == check.points, report.message
    assert graded(name, lambda *args, **kwargs: None).score == 0


def lost(graded, name, func, words):
    """The mistake costs points, and the message names the property it breaks."""
    report = graded(name, func)
    assert report.score < get_check(name).points, report.message
    assert any(words in failed for failed in report.failed), report.message
    return report


def test_a_cav_pointing_toward_the_random_set_loses_points(graded):
    lost(graded, "train_cav", lambda c, r, seed=0: -train_cav(c, r, seed), "points toward the concept")


def test_a_cav_not_normalized_loses_points(graded):
    def raw(concept_acts, random_acts, seed=0):
        from sklearn.linear_model import LogisticRegression

        x = torch.cat([concept_acts, random_acts]).numpy()
        y = np.r_[np.ones(len(concept_acts)), np.zeros(len(random_acts))]
        return torch.from_numpy(LogisticRegression(random_state=seed).fit(x, y).coef_[0]).float()

    report = lost(graded, "train_cav", raw, "unit length")
    assert not any("points toward" in f for f in report.failed)


def test_standardized_or_random_classifiers_lose_points(graded):
    def standardized(concept_acts, random_acts, seed=0):
        scale = torch.cat([concept_acts, random_acts]).std(0)
        return train_cav(concept_acts / scale, random_acts / scale, seed)

    def sgd(concept_acts, random_acts, seed=0):
        from sklearn.linear_model import SGDClassifier

        x = torch.cat([concept_acts, random_acts]).numpy()
        y = np.r_[np.ones(len(concept_acts)), np.zeros(len(random_acts))]
        w = torch.from_numpy(SGDClassifier(max_iter=5, tol=None).fit(x, y).coef_[0]).float()  # no random_state
        return w / w.norm()

    lost(graded, "train_cav", standardized, "LogisticRegression")
    lost(graded, "train_cav", sgd, "deterministic")


def test_scores_from_magnitudes_or_with_zeros_counted_lose_points(graded):
    def magnitude(d):
        return float(d.clamp(min=0).sum() / d.abs().sum())

    def non_negative(d):
        return float((d >= 0).float().mean())

    def tensor(d):
        return (d > 0).float().mean()

    lost(graded, "tcav_score", magnitude, "signs, not magnitudes")
    lost(graded, "tcav_score", non_negative, "exactly 0")
    lost(graded, "tcav_score", tensor, "Python float")


def test_the_derivative_of_the_probability_loses_points(graded):
    def of_probability(model, layer, images, target, cav):
        return ref._directional_variant(model, layer, images, target, cav, score="prob")

    lost(graded, "directional_derivatives", of_probability, "logit")


def test_the_activation_of_the_wrong_module_loses_points(graded):
    def before_the_layer(model, layer, images, target, cav):
        return ref._directional_variant(model, layer, images, target, cav, where="input")

    def previous_module(model, layer, images, target, cav):
        names = [name for name, _ in model.named_children()]
        index = names.index(layer)
        return directional_derivatives(model, names[index - 1], images, target, cav)

    lost(graded, "directional_derivatives", before_the_layer, "output of the named layer")
    report = graded("directional_derivatives", previous_module)
    assert report.score < get_check("directional_derivatives").points


def student_tcav_test(pairing=lambda i, r: (i, (i + 1) % r), min_sets=3, p_value=None):
    """A tcav_test with one knob per mistake (built from the reference's pieces, so that
    it costs what the reference costs: one backward pass, activations read once)."""
    def run(model, layer, target, target_images, concept_images, random_image_sets, seed=0):
        if len(random_image_sets) < min_sets:
            raise ValueError("too few random sets")
        acts = [ref._activations(model, layer, x) for x in [concept_images] + list(random_image_sets)]
        grads = ref._layer_gradients(model, layer, target_images, target)
        r = len(random_image_sets)

        def score(a, b):
            return tcav_score(ref._project(grads, train_cav(a, b, seed=seed)))

        scores = [score(acts[0], acts[1 + i]) for i in range(r)]
        random_scores = [score(acts[1 + a], acts[1 + b]) for a, b in (pairing(i, r) for i in range(r))]
        p = (p_value or (lambda s, q: stats.ttest_ind(s, q).pvalue))(scores, random_scores)
        return {"scores": scores, "score": float(np.mean(scores)), "random_scores": random_scores,
                "p_value": float(p), "significant": bool(p < 0.05)}
    return run


def composed_tcav_test(model, layer, target, target_images, concept_images, random_image_sets, seed=0):
    """tcav_test as a student writes it: from the three other graded functions."""
    if len(random_image_sets) < 3:
        raise ValueError("need at least 3 random sets")
    acts = [ref._activations(model, layer, x) for x in [concept_images] + list(random_image_sets)]
    r = len(random_image_sets)

    def score(a, b):
        return tcav_score(directional_derivatives(model, layer, target_images, target, train_cav(a, b, seed=seed)))

    scores = [score(acts[0], acts[1 + i]) for i in range(r)]
    random_scores = [score(acts[1 + i], acts[1 + (i + 1) % r]) for i in range(r)]
    p = float(stats.ttest_ind(scores, random_scores).pvalue)
    return {"scores": scores, "score": sum(scores) / r, "random_scores": random_scores, "p_value": p,
            "significant": p < 0.05}


def test_a_student_tcav_test_written_from_the_public_functions_earns_full_points(graded):
    report = graded("tcav_test", composed_tcav_test)
    assert report.score == get_check("tcav_test").points, report.message


def test_a_one_sided_test_or_a_test_against_half_loses_points(graded):
    one_sided = student_tcav_test(p_value=lambda s, q: stats.ttest_ind(s, q, alternative="greater").pvalue)
    against_half = student_tcav_test(p_value=lambda s, q: stats.ttest_1samp(s, 0.5).pvalue)
    welch = student_tcav_test(p_value=lambda s, q: stats.ttest_ind(s, q, equal_var=False).pvalue)
    for wrong in (one_sided, against_half, welch):
        report = lost(graded, "tcav_test", wrong, "two-sided Student t-test")
        assert not any("scores[i]" in f for f in report.failed), report.message


def test_accepting_fewer_than_three_random_sets_loses_points(graded):
    report = lost(graded, "tcav_test", student_tcav_test(min_sets=1), "fewer than three random sets")
    assert len(report.failed) == 1, report.message


def test_a_wrong_random_pairing_loses_points(graded):
    for pairing in (lambda i, r: ((i + 1) % r, i), lambda i, r: (i, (i - 1) % r)):
        report = lost(graded, "tcav_test", student_tcav_test(pairing=pairing), "random set (i + 1) % R")
        assert not any("two-sided" in f for f in report.failed), report.message
