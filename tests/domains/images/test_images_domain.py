from collections import Counter

import pytest
import torch
from PIL import Image

from domains.images import build_labelled_data, build_pretrain_data
from fedmoco.data import DataConfig, Normalization, collate_views, format_skipped, read_labels
from fedmoco.errors import DataError


def test_pretrain_views_have_shape_and_differ(demo_images):
    data = build_pretrain_data(demo_images, DataConfig(image_size=24))
    assert data.in_channels == 3 and len(data.dataset) == 48
    v1, v2 = data.dataset[0]
    assert v1.shape == v2.shape == (3, 24, 24) and v1.dtype == torch.float32
    assert not torch.equal(v1, v2)  # the two views are sampled independently


def test_grayscale_and_16bit_tiff_are_read(tmp_path):
    import numpy as np

    (tmp_path / "a").mkdir()
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(tmp_path / "a" / "g.png")
    Image.fromarray((np.arange(256, dtype=np.uint16) * 200).reshape(16, 16)).save(tmp_path / "a" / "h.tif")
    data = build_pretrain_data(tmp_path, DataConfig(image_size=8))
    assert data.in_channels == 1
    assert data.dataset[1][0].shape == (1, 8, 8)


@pytest.mark.parametrize("driver,name,extra", [("PNG", "c.png", {}), ("GTiff", "c.tif", {"photometric": "RGB"}),
                                               # planar: PIL's raw modes ('R', 'G', 'B') do not say 16 bits
                                               ("GTiff", "p.tif", {"photometric": "RGB", "interleave": "band"})])
def test_a_16_bit_colour_image_is_stretched_like_a_grayscale_one(tmp_path, driver, name, extra):
    """PIL reads 16-bit RGB PNG and TIFF as 8-bit RGB, keeping the high byte only: 12-bit values
    stored in 16 bits reached 15 of 255, almost black and 16 levels deep (found by an audit). They
    are decoded at full depth and stretched per image (minimum to 0, maximum to 255), by hand here."""
    import warnings

    import numpy as np
    import rasterio

    from domains.images.dataset import load_image

    values = np.random.default_rng(0).integers(0, 4096, (3, 9, 7)).astype(np.uint16)  # 12 bits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # not georeferenced
        with rasterio.open(tmp_path / name, "w", driver=driver, width=7, height=9, count=3, dtype="uint16",
                           **extra) as ds:
            ds.write(values)
    with Image.open(tmp_path / name) as im:
        assert im.mode == "RGB"  # what PIL alone would have given: the high byte
    lo, hi = values.min(), values.max()
    by_hand = ((values.astype(np.float32) - lo) / (hi - lo) * 255).astype(np.uint8)
    got = load_image(tmp_path / name, 3).numpy()
    assert got.shape == (3, 9, 7) and np.array_equal(got, by_hand)
    assert load_image(tmp_path / name, 1).shape == (1, 9, 7)


def test_a_float_tiff_with_non_finite_pixels_is_skipped_not_blackened(tmp_path, caplog):
    import numpy as np

    (tmp_path / "a").mkdir()
    good = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    Image.fromarray(good, "F").save(tmp_path / "a" / "good.tif")
    bad = good.copy()
    bad[0, 0] = np.inf  # scaled to 8 bit by its range, the whole image would become 0
    Image.fromarray(bad, "F").save(tmp_path / "a" / "inf.tif")
    data = build_pretrain_data(tmp_path, DataConfig(image_size=8))
    names = [f.name for f in data.dataset.files]
    assert data.dataset[names.index("good.tif")][0].shape == (1, 8, 8)
    assert data.dataset[names.index("inf.tif")] is None
    assert "inf.tif: unreadable image (NaN or infinite pixel values)" in caplog.text


def test_unreadable_image_becomes_none_and_is_counted(tmp_path, demo_images):
    import shutil

    shutil.copytree(demo_images / "circle", tmp_path / "circle")
    (tmp_path / "circle" / "broken.png").write_bytes(b"\x89PNG garbage")
    data = build_pretrain_data(tmp_path, DataConfig(image_size=16))
    idx = [i for i, f in enumerate(data.dataset.files) if f.name == "broken.png"][0]
    assert data.dataset[idx] is None
    batch, dropped = collate_views([data.dataset[idx], data.dataset[idx + 1]])
    assert dropped == 1 and batch[0].shape == (1, 3, 16, 16)


def test_labels_from_folders_and_csv(tmp_path, demo_images):
    data = build_labelled_data(demo_images, DataConfig(image_size=16), None, None)
    assert data.classes == ["circle", "square", "stripes", "triangle"]
    img, label = data.dataset[0]
    assert img.shape == (3, 16, 16) and label == 0
    files = sorted(demo_images.rglob("*.png"))[:3]
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n" + "".join(f"{f.relative_to(demo_images)},{i % 2}\n" for i, f in enumerate(files)))
    labels, classes = read_labels(demo_images, files, csv)
    assert labels == [0, 1, 0] and classes == ["0", "1"]
    csv.write_text("file,label\nx,1\n")
    with pytest.raises(DataError, match="labels.csv: needs a header with columns 'path' and 'label'"):
        read_labels(demo_images, files, csv)


def test_given_normalization_is_used(demo_images):
    norm = Normalization([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    data = build_labelled_data(demo_images, DataConfig(image_size=16), None, norm)
    img, _ = data.dataset[0]
    assert img.min() >= 0.0 and img.max() <= 1.0  # identity normalisation keeps [0, 1]


def test_option_errors_name_the_option(demo_images):
    with pytest.raises(DataError, match=r"unknown option\(s\) \['colour'\]"):
        build_pretrain_data(demo_images, DataConfig(options={"colour": 1}))
    with pytest.raises(DataError, match="crop_scale_min: must be a number in"):
        build_pretrain_data(demo_images, DataConfig(options={"crop_scale_min": 2}))
    with pytest.raises(DataError, match=r"crop_scale_min: must be a number in \(0, 1\], got 'half'"):
        build_pretrain_data(demo_images, DataConfig(options={"crop_scale_min": "half"}))


def test_empty_folder_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="data folder is empty"):
        build_pretrain_data(tmp_path, DataConfig())
    # a DICOM folder given to the images domain: say what is there, not just "empty"
    for i in range(3):
        (tmp_path / f"IM{i}.dcm").write_bytes(b"\0" * 132 + b"DICM")
    with pytest.raises(DataError) as err:
        build_pretrain_data(tmp_path, DataConfig())
    assert str(err.value) == (f"{tmp_path}: data folder is empty (no files with suffix .png, .jpg, .jpeg, .tif, "
                              ".tiff, .bmp); it holds 4 other file(s) (.dcm, .txt): is --domain right?")


def test_format_skipped_summary():
    assert format_skipped(Counter({"not DICOM": 2, "truncated": 1})) == "skipped 3 files: 2 not DICOM, 1 truncated"


def test_a_forged_header_is_refused_before_decoding(tmp_path, demo_images, caplog):
    """A 700-byte file that claims 65535^2 pixels (PIL's bomb error) and one that claims 6000^2
    (36 M, under PIL's limit, over max_pixels) are skipped from their headers: no traceback, a
    warning naming the file, and the normalisation comes from the readable images."""
    import logging
    import shutil

    from forged_files import forged_png

    shutil.copytree(demo_images / "circle", tmp_path / "circle")
    forged_png(tmp_path / "circle" / "bomb.png", 65535, 65535)
    forged_png(tmp_path / "circle" / "big.png", 6000, 6000)
    assert (tmp_path / "circle" / "bomb.png").stat().st_size < 1000
    with caplog.at_level(logging.WARNING):
        data = build_pretrain_data(tmp_path, DataConfig(image_size=16))
        by_name = {f.name: i for i, f in enumerate(data.dataset.files)}
        assert data.dataset[by_name["bomb.png"]] is None and data.dataset[by_name["big.png"]] is None
    assert "bomb.png: unreadable image (the header declares over" in caplog.text
    assert "big.png: unreadable image (the header declares 6000 x 6000 = 36000000 pixels, over max_pixels " \
           "33554432" in caplog.text
    assert data.normalization.channels == 3 and all(0 < m < 1 for m in data.normalization.mean)
    # a site that means it raises the cap; the 6000^2 header then passes and PIL finds the file truncated
    caplog.clear()
    raised = build_pretrain_data(tmp_path, DataConfig(image_size=16, options={"max_pixels": "40000000"}))
    with caplog.at_level(logging.WARNING):
        assert raised.dataset[by_name["big.png"]] is None
    assert "big.png: unreadable image" in caplog.text and "max_pixels" not in caplog.text
    with pytest.raises(DataError, match=r"--data-option max_pixels: must be a whole number >= 1, got '0'"):
        build_pretrain_data(tmp_path, DataConfig(image_size=16, options={"max_pixels": "0"}))


def test_other_formats_are_counted_and_a_strip_image_keeps_memory_bounded(tmp_path, demo_images):
    import shutil

    import numpy as np

    shutil.copytree(demo_images / "circle", tmp_path / "circle")
    Image.new("RGB", (8, 8)).save(tmp_path / "circle" / "anim.gif")
    Image.new("RGB", (8, 8)).save(tmp_path / "circle" / "pic.webp")
    Image.fromarray(np.full((1, 150000, 3), 200, np.uint8)).save(tmp_path / "circle" / "strip.png")  # < 1 KB
    data = build_pretrain_data(tmp_path, DataConfig(image_size=16))
    assert data.skipped == Counter({"not PNG/JPEG/TIFF/BMP (.gif)": 1, "not PNG/JPEG/TIFF/BMP (.webp)": 1})
    labelled = build_labelled_data(tmp_path, DataConfig(image_size=16), None, None)
    i = [f.name for f in labelled.dataset.files].index("strip.png")
    view, _ = labelled.dataset[i]
    assert view.shape == (3, 16, 16)  # letterboxed: resized to at most 8 x 16 = 128 px long, not 2.4 M


def _ico_holding_a_large_png(path, side: int) -> None:
    """An ICO whose directory declares 256 x 256 and whose one entry is a side x side PNG."""
    import io
    import struct

    import numpy as np

    png = io.BytesIO()
    Image.fromarray(np.zeros((side, side, 4), np.uint8)).save(png, "PNG")
    data = png.getvalue()
    path.write_bytes(struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(data), 22)
                     + data)


def _tiff_with_float_strip_offsets(path) -> None:
    """A 16 x 16 RGB TIFF whose StripOffsets tag (273) is typed FLOAT: PIL raises TypeError."""
    import io
    import struct

    import numpy as np

    b = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(b, "TIFF")
    d = bytearray(b.getvalue())
    ifd = struct.unpack("<I", d[4:8])[0]
    for k in range(struct.unpack("<H", d[ifd:ifd + 2])[0]):
        entry = ifd + 2 + 12 * k
        if struct.unpack("<H", d[entry:entry + 2])[0] == 273:
            d[entry + 2:entry + 4] = struct.pack("<H", 11)
    path.write_bytes(bytes(d))


def test_a_file_is_read_only_by_the_reader_its_suffix_names(tmp_path, demo_images, caplog, monkeypatch):
    """PIL picks a reader by content: an ICO named .png was decoded whole while opening, before
    the max_pixels check (650 MB for a 657 KB file), and GIF or WebP content under .png / .jpg was
    trained on (found by an audit). Each is now 'not an image', skipped and counted."""
    import shutil

    shutil.copytree(demo_images / "circle", tmp_path / "circle")
    _ico_holding_a_large_png(tmp_path / "circle" / "icon.png", 600)
    Image.new("RGB", (8, 8)).save(tmp_path / "circle" / "gif.png", "GIF")
    Image.new("RGB", (8, 8)).save(tmp_path / "circle" / "webp.jpg", "WEBP")
    decoded = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda im: decoded.append(im.size) or real_load(im))
    data = build_pretrain_data(tmp_path, DataConfig(image_size=16))
    names = [f.name for f in data.dataset.files]
    for name in ("icon.png", "gif.png", "webp.jpg"):
        assert data.dataset[names.index(name)] is None
        assert f"{name}: unreadable image (cannot identify image file" in caplog.text
    assert (600, 600) not in decoded  # the ICO's picture was never decoded
    from fedmoco.site_check import source_sizes

    skipped = Counter()
    source_sizes(data.dataset, skipped)
    assert skipped == Counter({"not an image": 3})


def test_a_png_named_jpg_and_a_jpeg_named_png_are_still_read(tmp_path):
    """Swapped suffixes are common in scraped datasets, and PNG / JPEG readers are lazy and safe:
    only other formats (ICO, GIF, WebP) are refused by content (found by a review)."""
    from domains.images.dataset import load_image

    Image.new("RGB", (12, 10), (10, 200, 30)).save(tmp_path / "a.jpg", "PNG")
    Image.new("RGB", (12, 10), (10, 200, 30)).save(tmp_path / "b.png", "JPEG", quality=100)
    for name in ("a.jpg", "b.png"):
        assert load_image(tmp_path / name, 3).shape == (3, 10, 12)


def test_a_malformed_tiff_is_skipped_not_a_traceback(tmp_path, demo_images, caplog):
    """PIL's TIFF parser raises TypeError on a FLOAT StripOffsets tag: pretrain, check-site and
    embed stopped in a traceback (found by an audit). The file is skipped and says why."""
    import shutil

    shutil.copytree(demo_images / "circle", tmp_path / "circle")
    _tiff_with_float_strip_offsets(tmp_path / "circle" / "bad.tif")
    data = build_pretrain_data(tmp_path, DataConfig(image_size=16))
    names = [f.name for f in data.dataset.files]
    assert data.dataset[names.index("bad.tif")] is None
    assert ("bad.tif: unreadable image (malformed file, TypeError: 'float' object cannot be interpreted as an "
            "integer)") in caplog.text


def test_exif_orientation_is_applied(tmp_path):
    from domains.images.dataset import load_image

    img = Image.new("RGB", (60, 40), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: a phone held upright
    img.save(tmp_path / "phone.jpg", exif=exif)
    assert load_image(tmp_path / "phone.jpg", 3).shape == (3, 60, 40)  # (C, H, W) upright


def test_no_readable_image_names_a_file_and_its_reason(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "sub" / name).write_bytes(b"")
    with pytest.raises(DataError, match=r"none of the 2 images could be read \(first: .*a\.png: "):
        build_pretrain_data(tmp_path, DataConfig(image_size=16))


def test_statistics_pass_over_a_run_of_broken_images_to_the_readable_ones(tmp_path):
    """The statistics read 64 evenly spaced images; 64 broken files that sort first made them
    all unreadable and stopped the site, though readable images followed. Now each broken
    pick is replaced by a readable image, and the statistics are those of the readable ones."""
    from domains.images.dataset import estimate_normalization

    for i in range(64):
        (tmp_path / f"a{i:03d}.png").write_bytes(b"not a png")
    for i, grey in enumerate((50, 150)):
        Image.new("L", (16, 16), grey).save(tmp_path / f"b{i}.png")
    files = sorted(tmp_path.iterdir())
    norm = estimate_normalization(files, channels=1, size=16)
    assert norm.mean == pytest.approx([100 / 255]) and norm.std == pytest.approx([50 / 255], rel=0.01)


def test_a_release_needs_federation_units_and_then_no_other_image_moves_an_item(tmp_path, demo_images):
    """The images domain normalises with statistics of the site's own files, so one added
    image moves every view: without run_config input-mean/std the release view is a refusal.
    With them, an image's release item is the same whatever other images the site holds."""
    import shutil

    from fedmoco.privacy import _read_alone

    files = sorted(p for p in demo_images.rglob("*.png"))
    small, large = tmp_path / "small", tmp_path / "large"
    for folder, kept in ((small, files[:6]), (large, files[:6] + files[-6:])):
        folder.mkdir()
        for f in kept:
            shutil.copy(f, folder / f"{f.parent.name}_{f.name}")
    cfg = DataConfig(image_size=32, seed=0, progress=False)
    a, b = build_pretrain_data(small, cfg), build_pretrain_data(large, cfg)
    assert a.normalization != b.normalization
    reason = a.release_view(None)
    assert isinstance(reason, str) and "input-mean and input-std" in reason
    target = Normalization([0.4] * a.in_channels, [0.3] * a.in_channels)
    va, vb = a.release_view(target), b.release_view(target)
    x, y = _read_alone(va, 0, 5), _read_alone(vb, 0, 5)  # the same file sorts first in both folders
    assert torch.equal(x[0], y[0])  # bit for bit: normalised with the federation's constants directly
    own_a, own_b = _read_alone(a.dataset, 0, 5), _read_alone(b.dataset, 0, 5)
    assert not torch.allclose(own_a[0], own_b[0], atol=1e-3)  # in the site's own units they differ
