import numpy as np
import pytest
import torch
from PIL import Image

from cs_helpers.data import SAMPLE_NAMES, image_folder, load_image, sample_images


def test_sample_images_have_names_sources_licences(photos):
    assert [p.name for p in photos] == list(SAMPLE_NAMES)
    for p in photos:
        assert p.image.shape == (3, 224, 224) and p.image.dtype == torch.float32
        assert 0 <= p.image.min() and p.image.max() <= 1
        assert p.source and p.license


def test_resize_shorter_side_then_centre_crop():
    array = np.zeros((100, 200, 3), dtype=np.uint8)
    array[:, 90:110] = 255  # a white bar in the centre survives the crop
    out = load_image(array, size=112)
    assert out.shape == (3, 112, 112)
    assert out[:, :, 56].mean() > 0.9 and out[:, :, 5].mean() < 0.05


def test_grayscale_rgba_float_and_tensor_inputs():
    gray = np.full((50, 60), 128, dtype=np.uint8)
    assert torch.allclose(load_image(gray, size=32), torch.full((3, 32, 32), 128 / 255), atol=1e-6)
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)  # fully transparent -> white
    assert load_image(rgba, size=32).min() == 1.0
    assert load_image(np.full((40, 40, 3), 0.25), size=32).mean().item() == pytest.approx(64 / 255, abs=1e-6)
    tensor = torch.rand(3, 40, 50)
    assert load_image(tensor, size=32).shape == (3, 32, 32)
    assert load_image(Image.new("L", (30, 30), 200), size=16).shape == (3, 16, 16)


def test_paths_and_folders(tmp_path):
    Image.new("RGB", (64, 48), (255, 0, 0)).save(tmp_path / "b.png")
    Image.new("RGB", (48, 64), (0, 0, 255)).save(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    folder = image_folder(tmp_path, size=32)
    assert folder.names() == ["a.jpg", "b.png"] and len(folder) == 2
    assert folder.tensor().shape == (2, 3, 32, 32)
    assert load_image(tmp_path / "b.png", size=32)[0].mean() > 0.95


def test_bad_inputs_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no image file"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="not a readable image"):
        load_image(tmp_path / "broken.png")
    with pytest.raises(ValueError, match="shape"):
        load_image(np.zeros((4, 4, 5)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_image(np.full((8, 8, 3), 3.0))
    with pytest.raises(TypeError, match="path, a PIL image"):
        load_image(42)
    with pytest.raises(ValueError, match="size"):
        load_image(np.zeros((8, 8, 3), dtype=np.uint8), size=0)
    with pytest.raises(NotADirectoryError):
        image_folder(tmp_path / "nope")
    with pytest.raises(ValueError, match="Unknown sample"):
        sample_images(["lena"])
