import pytest
import torch
from torch import nn

from cs_helpers import device
from cs_helpers.data import sample_images
from cs_helpers.grading.core import full_float32
from cs_helpers.models import EMBEDDED_DEFAULT, imagenet_classes, load_model, predict_topk


def test_embedded_model_is_frozen_in_eval_mode_with_readable_layers(lite0):
    assert not lite0.training
    assert all(not p.requires_grad for p in lite0.parameters())
    names = dict(lite0.named_modules())
    for layer in ("normalize", "stem.conv", "stem.relu", "blocks.0.depthwise.conv", "blocks.15.project.bn",
                  "head.relu", "pool", "classifier"):
        assert layer in names, layer
    assert tuple(lite0.stem.conv.weight.shape) == (32, 3, 3, 3)
    assert isinstance(list(lite0.children())[0], type(lite0.normalize))


def test_activations_are_separate_modules_used_once(lite0):
    relus = [m for m in lite0.modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]
    assert len(relus) == len({id(m) for m in relus}) == 1 + 16 * 2 - 1 + 1  # stem, 2 per block (block 0 has no expansion), head
    calls = []
    handles = [m.register_forward_hook(lambda *a: calls.append(1)) for m in relus]
    try:
        with torch.no_grad():
            lite0(torch.rand(1, 3, 64, 64))
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == len(relus)


def test_logits_match_the_independent_implementation(lite0, photos):
    from efficientnet_lite_pytorch import EfficientNet

    from cs_helpers.models import lite0_weights_path

    other = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=lite0_weights_path()).eval()
    images = torch.stack([p.image for p in photos])
    with torch.no_grad():
        ours = lite0(images)
        theirs = other((images * 255 - 127) / 128)
    assert ours.shape == (len(photos), 1000)
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("name, accepted", [
    ("coffee", {"espresso", "cup", "coffee mug"}),
    ("chelsea", {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"}),
    ("stereo_motorcycle", {"moped", "motor scooter"}),
])
def test_predicts_what_a_person_would(lite0, name, accepted):
    image = sample_images([name])[0].image
    top1 = predict_topk(lite0, image, k=1)[0][0][0]
    assert top1 in accepted


def test_predict_topk_shapes_and_errors(lite0):
    images = torch.rand(2, 3, 64, 64)
    top = predict_topk(lite0, images, k=3)
    assert len(top) == 2 and all(len(t) == 3 for t in top)
    probs = [p for _, p in top[0]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    with pytest.raises(ValueError, match="k must be"):
        predict_topk(lite0, images, k=0)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        predict_topk(lite0, torch.rand(2, 64, 64, 3), k=1)


def test_imagenet_classes():
    classes = imagenet_classes()
    assert len(classes) == 1000 and classes[0] == "tench" and "espresso" in classes


def test_random_initialization_differs_and_is_seeded():
    torch.manual_seed(0)
    a = load_model(EMBEDDED_DEFAULT, pretrained=False, device="cpu")
    torch.manual_seed(0)
    b = load_model(EMBEDDED_DEFAULT, pretrained=False, device="cpu")
    trained = load_model(EMBEDDED_DEFAULT, device="cpu")
    assert torch.equal(a.stem.conv.weight, b.stem.conv.weight)
    assert not torch.equal(a.stem.conv.weight, trained.stem.conv.weight)


def test_unknown_names_and_offline_torchvision_fail_clearly(monkeypatch):
    with pytest.raises(ValueError, match="Unknown model 'vgg19'.*efficientnet_lite0"):
        load_model("vgg19")
    with pytest.raises(TypeError, match="model name"):
        load_model(3)
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models, "squeezenet1_1", offline)
    with pytest.raises(RuntimeError, match="load_model\\('efficientnet_lite0'\\)"):
        load_model("squeezenet1_1")


def test_torchvision_architecture_without_weights_follows_conventions():
    model = load_model("squeezenet1_1", pretrained=False, device="cpu")
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    assert list(dict(model.named_children()))[0] == "normalize"
    assert all(not m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    with torch.no_grad():
        assert model(torch.rand(1, 3, 96, 96)).shape == (1, 1000)


def test_device_picks_cuda_only_when_present():
    assert device().type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.cuda
def test_embedded_model_on_cuda_matches_cpu(lite0, photos):
    images = torch.stack([p.image for p in photos[:3]])
    gpu = load_model(EMBEDDED_DEFAULT, device="cuda")
    with torch.no_grad():
        cpu = lite0(images)
        with full_float32():
            exact = gpu(images.cuda()).cpu()
        fast = gpu(images.cuda()).cpu()        # cuDNN's default: TF32 convolutions on recent GPUs
    assert (exact - cpu).abs().max().item() < 1e-3
    # TF32 moved the logits by 0.008 on an H100; the predictions stay.
    assert torch.equal(fast.argmax(1), cpu.argmax(1)) and (fast - cpu).abs().max().item() < 0.1
