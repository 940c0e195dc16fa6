"""The features reference against independent implementations, and the checks of
notebook 02 against the mistakes students make."""
import itertools
import math

import pytest
import torch
from torch import nn

from cs_helpers import grading
from cs_helpers.grading import get_check, hidden_seed
from cs_helpers.grading import tiny_models  # noqa: F401  (registers the tiny networks)
from cs_helpers.grading.core import ModelSpec, _hook_count, build_model
from cs_helpers.grading.sandbox import trusted_score
from cs_helpers.reference import features as ref
from cs_helpers.reference.features import (extract_features, nearest_neighbors, pca, receptive_field,
                                           top_activating_patches)

# -- nearest_neighbors ------------------------------------------------------------------


def _brute_force_neighbors(queries, database, k):
    """Sorting (distance, index) pairs in Python, one query at a time."""
    out = []
    for q in queries.tolist():
        dist = [(math.fsum((a - b) ** 2 for a, b in zip(q, row)), i) for i, row in enumerate(database.tolist())]
        out.append([i for _, i in sorted(dist)[:k]])
    return torch.tensor(out, dtype=torch.long)


@pytest.mark.parametrize("q, m, d, k", [(1, 5, 3, 1), (7, 40, 16, 5), (12, 100, 64, 10), (3, 9, 2, 9)])
def test_nearest_neighbors_matches_brute_force_and_cdist(q, m, d, k):
    g = torch.Generator().manual_seed(q * 1000 + m)
    queries, database = torch.randn(q, d, generator=g), torch.randn(m, d, generator=g)
    ours = nearest_neighbors(queries, database, k)
    assert ours.dtype == torch.long and ours.shape == (q, k)
    assert torch.equal(ours, _brute_force_neighbors(queries, database, k))
    by_cdist = torch.argsort(torch.cdist(queries.double(), database.double()), dim=1, stable=True)[:, :k]
    assert torch.equal(ours, by_cdist)


def test_nearest_neighbors_breaks_exact_ties_by_the_lower_index():
    g = torch.Generator().manual_seed(5)
    database = torch.randint(-2, 3, (60, 3), generator=g).float()   # many equal distances
    database[30:40] = database[0:10]                                   # and duplicate rows
    queries = torch.cat([database[[0, 5, 33]], torch.randint(-2, 3, (6, 3), generator=g).float()])
    for k in (1, 7, 25, 60):
        ours = nearest_neighbors(queries, database, k)
        assert torch.equal(ours, _brute_force_neighbors(queries, database, k))
        by_cdist = torch.argsort(torch.cdist(queries, database), dim=1, stable=True)[:, :k]
        assert torch.equal(ours, by_cdist)
    # A query equal to database rows finds those copies first, in increasing index.
    copies = [i for i in range(60) if torch.equal(database[i], database[3])]
    assert 3 in copies and 33 in copies
    assert nearest_neighbors(database[[3]], database, len(copies))[0].tolist() == copies


def test_nearest_neighbors_far_from_the_origin_and_errors():
    g = torch.Generator().manual_seed(2)
    database = torch.randn(50, 8, generator=g) * 1e-3 + 1e4   # the expanded formula cancels here
    queries = database[:5] + torch.randn(5, 8, generator=g) * 1e-4
    assert torch.equal(nearest_neighbors(queries, database, 3), _brute_force_neighbors(queries, database, 3))
    with pytest.raises(ValueError, match="features per row"):
        nearest_neighbors(torch.rand(2, 3), torch.rand(5, 4), 1)
    with pytest.raises(ValueError, match="between 1 and the number of database rows"):
        nearest_neighbors(torch.rand(2, 3), torch.rand(5, 3), 6)
    with pytest.raises(ValueError, match="2-D"):
        nearest_neighbors(torch.rand(3), torch.rand(5, 3), 1)


# -- pca -----------------------------------------------------------------------------------


def _sign_fixed(components):
    """The course's convention applied to any set of rows."""
    largest = components.abs().argmax(dim=1, keepdim=True)
    return torch.sign(components.gather(1, largest))


@pytest.mark.parametrize("n, d, k", [(50, 10, 3), (200, 64, 10), (12, 30, 5), (40, 4, 4)])
def test_pca_matches_scikit_learn_up_to_the_documented_sign(n, d, k):
    from sklearn.decomposition import PCA

    g = torch.Generator().manual_seed(n + d)
    features = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(3, 0.5, d, dtype=torch.float64)
    features = features @ torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0] + 7.0
    before = features.clone()
    projected, components, ratio = pca(features, k)
    assert torch.equal(features, before)
    assert projected.shape == (n, k) and components.shape == (k, d) and ratio.shape == (k,)
    assert projected.dtype == components.dtype == ratio.dtype == torch.float64

    skl = PCA(n_components=k, svd_solver="full").fit(features.numpy())
    skl_components = torch.from_numpy(skl.components_)
    skl_projected = torch.from_numpy(skl.transform(features.numpy()))
    signs = _sign_fixed(skl_components)                  # (k, 1)
    torch.testing.assert_close(components, skl_components * signs)
    torch.testing.assert_close(projected, skl_projected * signs.T)
    torch.testing.assert_close(ratio, torch.from_numpy(skl.explained_variance_ratio_))

    # The convention itself: orthonormal rows whose largest |entry| is positive.
    torch.testing.assert_close(components @ components.T, torch.eye(k, dtype=torch.float64))
    assert (_sign_fixed(components) > 0).all()


def test_pca_float32_in_float32_out_and_errors():
    x = torch.randn(20, 5)
    projected, components, ratio = pca(x, 2)
    assert projected.dtype == components.dtype == ratio.dtype == torch.float32
    assert 0 < float(ratio.sum()) <= 1
    _, _, constant = pca(torch.ones(6, 3), 2)
    assert torch.equal(constant, torch.zeros(2))
    with pytest.raises(ValueError, match=r"min\(N, D\)"):
        pca(torch.randn(3, 10), 4)
    with pytest.raises(ValueError, match="2-D"):
        pca(torch.randn(3, 4, 5), 2)


# -- receptive_field ---------------------------------------------------------------------------


def _measured_extent(chain, size=96, pool_layers=()):
    """Builds the chain with all-ones single-channel convolutions (average pooling where
    asked), backpropagates from output positions along the middle row and returns the
    first and last input column that receive gradient, for each output column."""
    layers = []
    for index, (kernel, stride, padding) in enumerate(chain):
        if index in pool_layers:
            layers.append(nn.AvgPool2d(kernel, stride, padding, count_include_pad=True))
        else:
            conv = nn.Conv2d(1, 1, kernel, stride, padding, bias=False)
            nn.init.ones_(conv.weight)
            layers.append(conv)
    net = nn.Sequential(*layers).double()
    x = torch.zeros(1, 1, size, size, dtype=torch.float64, requires_grad=True)
    out = net(x)
    h, w = out.shape[-2:]
    extents = {}
    for col in range(w):
        (grad,) = torch.autograd.grad(out[0, 0, h // 2, col], x, retain_graph=True)
        columns = grad[0, 0].abs().sum(dim=0).nonzero().flatten()
        extents[col] = (int(columns.min()), int(columns.max()))
    return extents


CHAINS = [
    ([(3, 1, 1)], ()),
    ([(5, 2, 0)], ()),
    ([(3, 2, 1), (3, 2, 1), (3, 1, 1)], ()),
    ([(7, 2, 3), (3, 2, 1), (5, 1, 2), (3, 2, 0)], (1,)),
    ([(5, 1, 2), (2, 2, 0), (3, 1, 1), (2, 2, 0), (3, 1, 1)], (1, 3)),   # ToyNet conv1 ... conv3
    ([(2, 1, 0), (4, 2, 1), (3, 3, 0)], ()),
]


@pytest.mark.parametrize("chain, pools", CHAINS)
def test_receptive_field_matches_the_gradient_footprint(chain, pools):
    size, jump, start = receptive_field(chain)
    extents = _measured_extent(chain, pool_layers=pools)
    interior = {c: e for c, e in extents.items() if e[0] > 0 and e[1] < 95}
    assert interior, "the test image is too small for this chain"
    for col, (first, last) in interior.items():
        assert last - first + 1 == size                      # size
        assert (first + last) / 2 == start + col * jump      # the centre, hence start and jump
    # Where the field hangs over the border, the visible part is the field clipped there.
    first, last = extents[0]
    assert first == max(0, math.ceil(start - (size - 1) / 2))
    assert last == start + (size - 1) / 2


def test_receptive_field_of_toynet_from_its_modules():
    from cs_helpers.toynet import ToyNet

    net = ToyNet()
    chain = []
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
            pair = lambda v: v if isinstance(v, int) else v[0]  # noqa: E731
            chain.append((pair(module.kernel_size), pair(module.stride), pair(module.padding)))
    assert receptive_field(chain) == (20, 4, 1.5)
    assert receptive_field([]) == (1, 1, 0.0)
    assert receptive_field([(1, 1, 0)] * 3) == (1, 1, 0.0)


def test_receptive_field_errors():
    with pytest.raises(ValueError, match="kernel, stride, padding"):
        receptive_field([(3, 1)])
    with pytest.raises(ValueError, match="stride >= 1"):
        receptive_field([(3, 0, 1)])
    with pytest.raises(ValueError, match="list of"):
        receptive_field("3,1,1")


# -- top_activating_patches ---------------------------------------------------------------------


def test_top_activating_patches_against_sorting_every_position():
    g = torch.Generator().manual_seed(0)
    acts = torch.randint(-2, 5, (7, 3, 4, 6), generator=g).float().clamp_min(0)   # many ties
    before = acts.clone()
    for channel, k in [(0, 1), (1, 10), (2, 7 * 4 * 6)]:
        got = top_activating_patches(acts, channel, k)
        everything = sorted((-float(acts[n, channel, i, j]), n, i, j)
                            for n, i, j in itertools.product(range(7), range(4), range(6)))
        assert got == [(n, i, j, -v) for v, n, i, j in everything[:k]]
        assert all(type(t[0]) is int and type(t[3]) is float for t in got)
    assert torch.equal(acts, before)
    with pytest.raises(ValueError, match="channel"):
        top_activating_patches(acts, 3, 1)
    with pytest.raises(ValueError, match="N \\* h \\* w"):
        top_activating_patches(acts, 0, 7 * 4 * 6 + 1)


# -- extract_features -------------------------------------------------------------------------------


@pytest.fixture
def tiny():
    return build_model(ModelSpec("tiny_relu_cnn", 3))


def test_extract_features_equals_the_layer_output_flattened(tiny):
    images = torch.rand(7, 3, 12, 12)
    with torch.no_grad():
        expected = tiny.pool1(tiny.relu1(tiny.conv1(tiny.normalize(images)))).flatten(1)
    for batch_size in (1, 3, 7, 32):
        got = extract_features(tiny, "pool1", images, batch_size=batch_size)
        assert got.dtype == torch.float32 and not got.requires_grad
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(extract_features(tiny, tiny.pool1, images), expected)
    assert extract_features(tiny, "classifier", images).shape == (7, 5)
    assert _hook_count(tiny) == 0


def test_extract_features_leaves_no_hook_also_when_the_model_raises():
    model = build_model(ModelSpec("tiny_batch4_cnn", 0))
    images = torch.rand(6, 3, 8, 8)
    assert extract_features(model, "relu2", images, batch_size=4).shape == (6, 8 * 4 * 4)
    with pytest.raises(RuntimeError, match="at most 4 images"):
        extract_features(model, "relu2", images, batch_size=6)
    assert _hook_count(model) == 0
    with pytest.raises(ValueError, match="no layer named"):
        extract_features(model, "conv9", images)
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(model, "relu2", images, batch_size=0)
    assert _hook_count(model) == 0 and not model.training


def test_extract_features_on_efficientnet_nested_layers(lite0):
    images = torch.rand(3, 3, 64, 64)
    features = extract_features(lite0, "pool", images, batch_size=2)
    assert features.shape == (3, 1280)
    with torch.no_grad():
        logits = lite0(images)
    torch.testing.assert_close(lite0.classifier(features), logits, rtol=1e-4, atol=1e-4)
    assert extract_features(lite0, "blocks.1.project", images).shape == (3, 24 * 16 * 16)


# -- the checks take points from real mistakes ------------------------------------------------------


def _score(name, func, capsys):
    score = grading.score(name, func)
    out = capsys.readouterr()
    assert out.err == "" and "Traceback" not in out.out
    return score, out.out


def _loses(name, func, capsys, *failed):
    """``func`` scores above 0 and below full points, and the message names each property
    fragment in ``failed`` as not yet right."""
    score, message = _score(name, func, capsys)
    assert 0 < score < get_check(name).points, message
    not_right = message.split("Not yet right:")[1]
    for fragment in failed:
        assert fragment in not_right, (fragment, message)
    return not_right


def _advised(name, func, capsys, fragment):
    """``func`` returns the right values, so it earns full points, and the message names
    ``fragment`` as advice: what is recorded in the graded process (inputs after the call,
    hooks, Python calls) earns no points, since that process could forge it."""
    score, message = _score(name, func, capsys)
    assert score == get_check(name).points, message
    assert fragment in message.split("Also worth fixing (advice, no points):")[1], message


def test_every_features_check_gives_the_reference_full_points(capsys):
    for name in ("extract_features", "nearest_neighbors", "pca", "receptive_field", "top_activating_patches"):
        score, message = _score(name, getattr(ref, name), capsys)
        assert score == get_check(name).points, message


def test_nearest_neighbor_mistakes_lose_points(capsys):
    def loop_over_queries(queries, database, k):
        rows = []
        for q in queries:
            d = ((database - q) ** 2).sum(dim=1)
            rows.append(torch.sort(d, stable=True).indices[:k])
        return torch.stack(rows)

    def farthest_first(queries, database, k):
        return ref.nearest_neighbors(queries, database, k).flip(1)

    def higher_index_on_ties(queries, database, k):
        d = torch.cdist(queries.double(), database.double())
        # sort by distance, ties by decreasing index
        m = database.shape[0]
        flipped = torch.sort(d.flip(1), dim=1, stable=True).indices
        return (m - 1 - flipped)[:, :k]

    def dot_product(queries, database, k):
        return torch.sort(-(queries @ database.T), dim=1, stable=True).indices[:, :k]

    _advised("nearest_neighbors", loop_over_queries, capsys, "no Python loop over queries")
    _loses("nearest_neighbors", farthest_first, capsys, "nearest first")
    rest = _loses("nearest_neighbors", higher_index_on_ties, capsys, "breaks ties")
    assert "nearest first" not in rest
    _loses("nearest_neighbors", dot_product, capsys, "Euclidean distance")


def test_pca_mistakes_lose_points(capsys):
    def no_centring(features, k):
        _, s, vh = torch.linalg.svd(features.double(), full_matrices=False)
        comps = vh[:k] * _sign_fixed(vh[:k])
        return (features.double() @ comps.T).float(), comps.float(), (s[:k] ** 2 / (s ** 2).sum()).float()

    def no_sign_fix(features, k):
        x = features - features.mean(0)
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        return x @ vh[:k].T, vh[:k], s[:k] ** 2 / (s ** 2).sum()

    def variance_not_ratio(features, k):
        projected, components, _ = ref.pca(features, k)
        return projected, components, projected.var(dim=0)

    def ratio_of_kept_only(features, k):
        projected, components, ratio = ref.pca(features, k)
        return projected, components, ratio / ratio.sum()

    def centres_in_place(features, k):
        features -= features.mean(dim=0)
        return ref.pca(features, k)

    def first_entry_positive(features, k):
        projected, components, ratio = ref.pca(features, k)
        signs = torch.sign(components[:, :1])
        return projected * signs.T, components * signs, ratio

    for wrong, fragment in [(no_centring, "centres the features"), (no_sign_fix, "fixes each component's sign"),
                            (variance_not_ratio, "share of the total variance"),
                            (ratio_of_kept_only, "share of the total variance"),
                            (first_entry_positive, "fixes each component's sign")]:
        rest = _loses("pca", wrong, capsys, fragment)
        if wrong is not no_centring:
            assert "centres the features" not in rest, wrong.__name__
    _advised("pca", centres_in_place, capsys, "leaves the features unchanged")


def test_receptive_field_mistakes_lose_points(capsys):
    def no_jump_in_size(layers):
        size, jump, start = 1, 1, 0.0
        for k, s, p in layers:
            start += ((k - 1) / 2 - p) * jump
            size += k - 1
            jump *= s
        return size, jump, start

    def no_padding_in_start(layers):
        size, jump, start = 1, 1, 0.0
        for k, s, p in layers:
            start += (k - 1) / 2 * jump
            size += (k - 1) * jump
            jump *= s
        return size, jump, start

    def pixel_edges_not_centres(layers):
        size, jump, start = ref.receptive_field(layers)
        return size, jump, start + 0.5

    def start_offset_not_scaled(layers):
        size, jump, start = 1, 1, 0.0
        for k, s, p in layers:
            start += (k - 1) / 2 - p
            size += (k - 1) * jump
            jump *= s
        return size, jump, start

    rest = _loses("receptive_field", no_jump_in_size, capsys, "size grows")
    assert "jump is the product" not in rest
    rest = _loses("receptive_field", no_padding_in_start, capsys, "start with padding")
    assert "size grows" not in rest and "start: each layer" not in rest
    _loses("receptive_field", pixel_edges_not_centres, capsys, "start: each layer", "start with padding")
    _loses("receptive_field", start_offset_not_scaled, capsys, "start: each layer")


def test_top_patch_mistakes_lose_points(capsys):
    def last_index_on_ties(activations, channel, k):
        values = activations[:, channel].reshape(-1)
        order = values.numel() - 1 - torch.sort(values.flip(0), descending=True, stable=True).indices
        n, h, w = activations.shape[0], activations.shape[2], activations.shape[3]
        return [(int(f) // (h * w), int(f) // w % h, int(f) % w, float(values[f])) for f in order[:k]]

    def wrong_channel_indexing(activations, channel, k):
        maps = activations[channel]                 # image `channel`, all its channels
        return ref.top_activating_patches(maps.unsqueeze(1), 0, k)

    def masks_in_place(activations, channel, k):
        out = []
        maps = activations[:, channel]
        h, w = maps.shape[1:]
        for _ in range(k):
            f = int(maps.reshape(-1).argmax())
            n, i, j = f // (h * w), f // w % h, f % w
            out.append((n, i, j, float(maps[n, i, j])))
            maps[n, i, j] = -float("inf")
        return out

    def unravel_by_height(activations, channel, k):
        h = activations.shape[2]
        w = activations.shape[3]
        out = []
        for n, i, j, v in ref.top_activating_patches(activations, channel, k):
            f = i * w + j
            out.append((n, f // h, f % h, v) if h != w else (n, i, j, v))
        return out

    def ascending(activations, channel, k):
        return ref.top_activating_patches(activations, channel, k)[::-1]

    rest = _loses("top_activating_patches", last_index_on_ties, capsys, "breaks ties")
    assert "largest first" not in rest
    _loses("top_activating_patches", wrong_channel_indexing, capsys, "requested channel")
    _advised("top_activating_patches", masks_in_place, capsys, "leaves the activations unchanged")
    rest = _loses("top_activating_patches", unravel_by_height, capsys, "non-square")
    assert "largest first" not in rest
    _loses("top_activating_patches", ascending, capsys, "largest first")


def test_extract_features_mistakes_lose_points(capsys):
    from cs_helpers.hooks import capture, model_device

    def not_flattened(model, layer, images, batch_size=32):
        with torch.no_grad(), capture(model, layer) as record:
            outs = []
            for batch in images.split(batch_size):
                model(batch.to(model_device(model)))
                outs.append(record.output)
        return torch.cat(outs)

    def leaves_hook(model, layer, images, batch_size=32):
        store = []
        model.get_submodule(layer).register_forward_hook(lambda m, i, o: store.append(o.flatten(1)))
        with torch.no_grad():
            for batch in images.split(batch_size):
                model(batch)
        return torch.cat(store[-math.ceil(len(images) / batch_size):])

    def no_batches(model, layer, images, batch_size=32):
        return ref.extract_features(model, layer, images, batch_size=len(images))

    def top_level_only(model, layer, images, batch_size=32):
        getattr(model, layer)
        return ref.extract_features(model, layer, images, batch_size)

    rest = _loses("extract_features", not_flattened, capsys, "returns (N, D)")
    assert "output values" not in rest
    _advised("extract_features", leaves_hook, capsys, "removes its hook")

    def training_mode(model, layer, images, batch_size=32):
        model.train()
        try:
            return ref.extract_features(model, layer, images, batch_size)
        finally:
            model.eval()

    # Batch statistics instead of the running ones: visible in the returned values.
    rest = _loses("extract_features", training_mode, capsys, "in eval mode")
    assert "output values" not in rest
    rest = _loses("extract_features", no_batches, capsys, "batches of at most batch_size")
    assert "output values" not in rest and "removes its hook" not in rest
    rest = _loses("extract_features", top_level_only, capsys, "nested layer")
    assert "output values" not in rest


def test_wrong_answers_score_nothing():
    for name in ("extract_features", "nearest_neighbors", "pca", "receptive_field", "top_activating_patches"):
        assert grading.score(name, lambda *a, **k: None, quiet=True) == 0
        assert grading.score(name, lambda *a, **k: 0, quiet=True) == 0


# -- across the trust boundary -------------------------------------------------------------------

SETUP = "import math\nimport torch\nfrom torch import nn\nfrom cs_helpers import grading\n"

STUDENT_EXTRACT = '''
from cs_helpers.hooks import capture, model_device


def extract_features(model, layer, images, batch_size=32):
    device = model_device(model)
    rows = []
    with torch.no_grad(), capture(model, layer) as record:
        for start in range(0, images.shape[0], batch_size):
            model(images[start:start + batch_size].to(device))
            rows.append(record.output.flatten(1).float())
    return torch.cat(rows)
'''

STUDENT_NEIGHBORS = '''
def nearest_neighbors(queries, database, k):
    d = torch.cdist(queries.double(), database.double())
    return torch.sort(d, dim=1, stable=True).indices[:, :k]
'''


def test_trusted_scores_of_student_code_in_the_child_process():
    for name, source in (("extract_features", STUDENT_EXTRACT), ("nearest_neighbors", STUDENT_NEIGHBORS)):
        check = get_check(name)
        report = trusted_score(check, [SETUP, source], hidden_seed(name))
        assert report.score == check.points, report.message
    wrong = STUDENT_NEIGHBORS.replace("[:, :k]", "[:, -k:].flip(1)")
    report = trusted_score(get_check("nearest_neighbors"), [SETUP, wrong], hidden_seed("nearest_neighbors"))
    assert report.score < get_check("nearest_neighbors").points
