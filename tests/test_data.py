"""The digits split and the image-folder dataset."""
import numpy as np
import pytest
import torch
from PIL import Image

from pyevo import data
from pyevo.data import ImageFolder, digits


def _sorted_rows(images: torch.Tensor) -> np.ndarray:
    flat = images.reshape(len(images), -1).numpy()
    return flat[np.lexsort(flat.T[::-1])]


def test_digits_shapes_dtypes_and_range():
    train_x, train_y = digits("train")
    held_x, held_y = digits("heldout")
    assert train_x.shape == (1297, 1, 16, 16) and held_x.shape == (500, 1, 16, 16)
    assert train_x.dtype == held_x.dtype == torch.float32
    assert train_y.dtype == held_y.dtype == torch.int64
    for x in (train_x, held_x):
        assert x.min().item() == -1.0 and x.max().item() == 1.0  # background and full ink
    assert set(train_y.tolist()) == set(held_y.tolist()) == set(range(10))


def test_digits_split_is_stratified():
    _, held_y = digits("heldout")
    counts = torch.bincount(held_y, minlength=10)
    assert counts.min().item() >= 48 and counts.max().item() <= 52


def test_digits_split_is_a_fixed_partition():
    train_x, train_y = digits("train")
    held_x, held_y = digits("heldout")
    all_x, all_y = digits("all")
    assert len(all_x) == 1797 == len(train_x) + len(held_x)
    # Together the two splits are exactly the whole set (as a multiset), so they are disjoint.
    np.testing.assert_array_equal(_sorted_rows(torch.cat([train_x, held_x])), _sorted_rows(all_x))
    assert torch.equal(torch.bincount(torch.cat([train_y, held_y])), torch.bincount(all_y))
    # Recomputing from scratch (cache cleared) gives the same split.
    data._digits_all.cache_clear()
    again_x, again_y = digits("heldout")
    assert torch.equal(again_x, held_x) and torch.equal(again_y, held_y)


def test_digits_matches_sklearn_up_to_resizing():
    from sklearn.datasets import load_digits

    all_x, all_y = digits("all")
    raw = load_digits()
    np.testing.assert_array_equal(all_y.numpy(), raw.target)
    # 2x2 average pooling of the bilinear 2x upsample is a slightly blurred copy of the 8x8 original.
    pooled = torch.nn.functional.avg_pool2d((all_x + 1) / 2, 2)[:, 0].numpy().reshape(len(all_y), -1)
    original = raw.images.reshape(len(all_y), -1) / 16.0
    assert np.abs(pooled - original).mean() < 0.1
    assert np.corrcoef(pooled.ravel(), original.ravel())[0, 1] > 0.95


def test_digits_at_32_keep_the_split_and_resize_back_to_the_16x16_digits():
    big_x, big_y = digits("heldout", size=32)
    small_x, small_y = digits("heldout")
    assert big_x.shape == (500, 1, 32, 32) and torch.equal(big_y, small_y)
    # The same 8x8 scans, upsampled twice as far; seen at 16x16 again they are the 16x16 digits.
    back = data.at_digits_size(big_x)
    assert back.shape == small_x.shape and (back - small_x).abs().mean() < 0.05
    assert data.at_digits_size(small_x) is small_x
    assert data.is_digits_shape((1, 32, 32)) and not data.is_digits_shape((3, 32, 32))
    with pytest.raises(ValueError, match=r"\(N, 1, S, S\)"):
        data.at_digits_size(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="positive"):
        digits("train", size=0)


def test_digits_bad_split():
    with pytest.raises(ValueError, match="unknown digits split 'test'"):
        digits("test")


@pytest.fixture
def image_dir(tmp_path):
    Image.new("L", (20, 20), 255).save(tmp_path / "white.png")
    Image.new("RGB", (8, 12), (0, 0, 0)).save(tmp_path / "black.png")
    (tmp_path / "nested").mkdir()
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "nested" / "red.png")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_image_folder_grayscale(image_dir):
    ds = ImageFolder(image_dir, size=16, channels=1)
    assert len(ds) == 3  # the .txt file is skipped, the nested image found
    items = {p.name: ds[i] for i, p in enumerate(ds.paths)}
    for item in items.values():
        assert item.shape == (1, 16, 16) and item.dtype == torch.float32
        assert item.min() >= -1.0 and item.max() <= 1.0
    assert torch.allclose(items["white.png"], torch.ones(1, 16, 16))
    assert torch.allclose(items["black.png"], -torch.ones(1, 16, 16))


def test_image_folder_rgb(image_dir):
    ds = ImageFolder(image_dir, size=8, channels=3)
    red = ds[[p.name for p in ds.paths].index("red.png")]
    assert red.shape == (3, 8, 8)
    assert torch.allclose(red[0], torch.ones(8, 8)) and torch.allclose(red[1:], -torch.ones(2, 8, 8))


def test_image_folder_centre_crops_and_counts_what_it_changed(tmp_path, caplog):
    # A 12x4 image: left third black, middle third white, right third black. The centre square is
    # the white middle; squashing the whole image instead would keep the black thirds.
    pixels = np.zeros((4, 12), dtype=np.uint8)
    pixels[:, 4:8] = 255
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    Image.new("L", (8, 8), 0).save(tmp_path / "square.png")
    Image.new("RGB", (8, 8), (255, 255, 255)).save(tmp_path / "rgb.png")
    ds = ImageFolder(tmp_path, size=8, channels=1)
    with caplog.at_level("INFO", logger="pyevo.data"):
        images, labels = ds.load()
    assert labels is None and images.shape == (3, 1, 8, 8)
    wide = images[[p.name for p in ds.paths].index("wide.png")]
    assert torch.allclose(wide, torch.ones(1, 8, 8), atol=1e-6)
    assert "3 images read (1 converted, 1 cropped, 1 resized)" in caplog.text


def test_unreadable_image_is_named_or_skipped_and_counted(tmp_path, caplog):
    from pyevo.data import UnreadableImage

    for i in range(2):
        Image.new("L", (8, 8), 40 * i).save(tmp_path / f"{i}.png")
    good = (tmp_path / "0.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.png").write_text("not a png")
    ds = ImageFolder(tmp_path, size=8, channels=1)
    with pytest.raises(UnreadableImage, match=r"cannot read image .*text\.png"):
        ds.load()
    with caplog.at_level("INFO", logger="pyevo.data"):
        images, _ = ds.load(skip_unreadable=True)
    assert len(images) == 2 and "2 unreadable skipped" in caplog.text
    for name in ("0.png", "1.png"):
        (tmp_path / name).unlink()
    with pytest.raises(ValueError, match="none of its 2 images could be read"):
        ImageFolder(tmp_path, size=8, channels=1).load(skip_unreadable=True)


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="holds no images"):
        ImageFolder(tmp_path, size=16)
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolder(tmp_path / "missing", size=16)
    with pytest.raises(ValueError, match="channels must be 1"):
        ImageFolder(tmp_path, size=16, channels=2)


def _save(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4), value, dtype=np.uint8)).save(path)


def test_image_folder_labels_come_from_class_sub_folders(tmp_path):
    # Numeric sub-folder names are the labels themselves ("7/" is class 7)...
    for label, name in ((3, "a.png"), (7, "b.png"), (3, "c.png")):
        _save(tmp_path / "numeric" / str(label) / name, 10 * label)
    folder = ImageFolder(tmp_path / "numeric", size=4, channels=1, labelled=True)
    assert folder.labels.tolist() == [3, 3, 7] and folder.class_names == ["3", "7"]
    # ...other names are indices in sorted order, like torchvision's ImageFolder.
    for name in ("dog", "cat"):
        _save(tmp_path / "named" / name / "x.png", 0)
    assert ImageFolder(tmp_path / "named", size=4, channels=1, labelled=True).labels.tolist() == [0, 1]
    assert ImageFolder(tmp_path / "named", size=4, channels=1).labels is None
    _save(tmp_path / "named" / "loose.png", 0)
    with pytest.raises(ValueError, match="images outside class sub-folders .*loose.png"):
        ImageFolder(tmp_path / "named", size=4, channels=1, labelled=True)
