"""Taking the encoder elsewhere: export to torchvision/TorchScript, embed a folder, plot a federation."""

import csv
import json

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from fedmoco.checkpoint import atomic_save
from fedmoco.cli import main
from fedmoco.config import MoCoConfig
from fedmoco.moco import MoCo
from fedmoco.pretrain import make_checkpoint

MEDICAL = {"domain": "medical", "image_size": 32, "options": {"ct_window": "lung"}, "normalization": None}


def _checkpoint(path, *, arch, channels, small, norm="split-batch", data=None):
    """A MoCo checkpoint whose BN running statistics moved away from their initial values."""
    torch.manual_seed(0)
    model = MoCo(MoCoConfig(arch=arch, in_channels=channels, small_input=small, norm=norm, norm_splits=2,
                            dim=8, hidden_dim=16, queue_size=16))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model.encoder_q.backbone(torch.randn(8, channels, 32, 32) * 2 + 0.5)
    data = data or {"domain": "images", "image_size": 32, "options": {},
                    "normalization": {"mean": [0.4] * channels, "std": [0.2] * channels}}
    atomic_save(make_checkpoint(model, data=data, epoch=3), path)
    return model.encoder_q.backbone.eval()


def _plain_resnet18(channels, small):
    """What the README tells a torchvision user to build."""
    net = torchvision.models.resnet18()
    if small:
        net.conv1 = nn.Conv2d(channels, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif channels != 3:
        net.conv1 = nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
    return net


@pytest.mark.parametrize("channels,small,size", [(1, True, 32), (3, False, 64)])
def test_export_loads_into_plain_torchvision_and_torchscript_with_identical_features(tmp_path, channels, small, size):
    reference = _checkpoint(tmp_path / "ckpt.pt", arch="resnet18", channels=channels, small=small)
    assert main(["export", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "export")]) == 0

    net = _plain_resnet18(channels, small)
    state = torch.load(tmp_path / "export" / "backbone.pt", weights_only=True)
    result = net.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    net.fc = nn.Identity()
    net.eval()
    scripted = torch.jit.load(str(tmp_path / "export" / "encoder.ts"))
    x = torch.randn(4, channels, size, size)
    with torch.no_grad():
        expected = reference(x)
        assert expected.shape == (4, 512)
        torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(scripted(x), expected, rtol=1e-5, atol=1e-5)

    info = json.loads((tmp_path / "export" / "encoder.json").read_text())
    assert info["arch"] == "resnet18" and info["channels"] == channels and info["small_input"] is small
    assert info["image_size"] == 32 and info["feature_dim"] == 512 and info["torchvision"] == "resnet18"
    assert info["input"]["normalization"] == {"mean": [0.4] * channels, "std": [0.2] * channels}


def test_export_tiny_is_torchscript_only_and_records_the_medical_windowing(tmp_path, capsys):
    reference = _checkpoint(tmp_path / "ckpt.pt", arch="tiny", channels=1, small=True, data=MEDICAL)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "backbone.pt").write_bytes(b"an earlier resnet export")  # would pass for this one
    assert main(["export", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "export")]) == 0
    assert not (tmp_path / "export" / "backbone.pt").exists()
    assert "torchvision state_dict" not in capsys.readouterr().out
    scripted = torch.jit.load(str(tmp_path / "export" / "encoder.ts"))
    x = torch.randn(3, 1, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), reference(x), rtol=1e-5, atol=1e-5)
    info = json.loads((tmp_path / "export" / "encoder.json").read_text())
    assert info["arch"] == "tiny" and info["torchvision"] is None and info["feature_dim"] == 128
    window = info["input"]["windowing"]["ct"]
    assert (window["preset"], window["center_hu"], window["width_hu"]) == ("lung", -600.0, 1500.0)
    # a federated encoder records no normalisation; the medical domain's fixed one is stated
    assert info["input"]["normalization"] == {"mean": [0.5], "std": [0.25]}


def test_export_group_norm_resnet_loads_with_groupnorm_layers(tmp_path):
    import math
    reference = _checkpoint(tmp_path / "ckpt.pt", arch="resnet18", channels=4, small=True, norm="group")
    main(["export", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "export")])
    info = json.loads((tmp_path / "export" / "encoder.json").read_text())
    assert info["norm"] == "group"
    net = torchvision.models.resnet18(norm_layer=lambda c: nn.GroupNorm(math.gcd(32, c), c))
    net.conv1, net.maxpool = nn.Conv2d(4, 64, 3, 1, 1, bias=False), nn.Identity()
    res = net.load_state_dict(torch.load(tmp_path / "export" / "backbone.pt", weights_only=True), strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and not res.unexpected_keys
    net.fc = nn.Identity()
    x = torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), reference(x), rtol=1e-5, atol=1e-5)


def test_export_refuses_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint")
    assert main(["export", str(bad), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedmoco export: error:") and str(bad) in err and len(err.splitlines()) == 1


def test_embed_writes_one_row_per_image_with_its_relative_path(tmp_path, demo_images):
    reference = _checkpoint(tmp_path / "ckpt.pt", arch="tiny", channels=3, small=True)
    (demo_images.parent / "stray").mkdir(exist_ok=True)
    assert main(["-q", "embed", str(tmp_path / "ckpt.pt"), "--data", str(demo_images),
                 "--out", str(tmp_path / "emb" / "features.npy")]) == 0
    feats = np.load(tmp_path / "emb" / "features.npy")
    with open(tmp_path / "emb" / "features.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert feats.shape == (48, 128) and feats.dtype == np.float32 and len(rows) == 48
    assert [int(r["row"]) for r in rows] == list(range(48))
    assert rows[0]["path"] == "circle/circle_000.png" and rows[0]["region"] == ""
    # row 5's features are those of the file the CSV names, through the recorded normalisation
    from domains.images.dataset import eval_transform, load_image
    from fedmoco.data import Normalization
    norm = Normalization([0.4] * 3, [0.2] * 3)
    x = eval_transform(32, norm)(load_image(demo_images / rows[5]["path"], 3))
    with torch.no_grad():
        np.testing.assert_allclose(feats[5], reference(x[None])[0].numpy(), rtol=1e-4, atol=1e-5)


def test_embed_names_dicom_frames(tmp_path):
    from domains.medical.demo import make_demo_archive
    data = make_demo_archive(tmp_path / "dicom", n_patients=3, image_size=32, n_slices=2)
    _checkpoint(tmp_path / "ckpt.pt", arch="tiny", channels=1, small=True, data=MEDICAL)
    assert main(["-q", "embed", str(tmp_path / "ckpt.pt"), "--data", str(data), "--out", str(tmp_path / "e")]) == 0
    with open(tmp_path / "e.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == np.load(tmp_path / "e.npy").shape[0] == 3 * 2 + 3  # CT slices + one CR each
    assert all(r["region"].startswith("frame=") for r in rows)
    assert all((data / r["path"]).is_file() and not r["path"].startswith("/") for r in rows)
    assert not any(r["path"].startswith("misc/") for r in rows)  # broken files skipped while indexing


def test_a_grayscale_federation_encoder_reads_colour_files_as_its_sites_did(tmp_path, demo_images, capsys):
    """A federation without input-mean/std records no normalisation; embed and knn then took the
    channel count from the RGB files and refused the 1-channel encoder the sites had trained on
    those very files (each site converts to the federation's in-channels; found by an audit)."""
    data = {"domain": "images", "image_size": 32, "options": {}, "normalization": None}
    _checkpoint(tmp_path / "ckpt.pt", arch="tiny", channels=1, small=True, data=data)
    assert main(["-q", "embed", str(tmp_path / "ckpt.pt"), "--data", str(demo_images),
                 "--out", str(tmp_path / "e")]) == 0
    assert np.load(tmp_path / "e.npy").shape == (48, 128)
    assert main(["-q", "knn", "--checkpoint", str(tmp_path / "ckpt.pt"), "--data", str(demo_images),
                 "--out", str(tmp_path / "k")]) == 0
    # a channel count the user gives still wins, and is checked against the encoder
    assert main(["-q", "embed", str(tmp_path / "ckpt.pt"), "--data", str(demo_images), "--data-option",
                 "channels=3", "--out", str(tmp_path / "e3")]) == 2
    assert "encoder takes 1 channel(s) but" in capsys.readouterr().err


def test_a_checkpoint_of_a_domain_this_fedmoco_lacks_is_named_not_blamed_on_domain(tmp_path, demo_images, capsys):
    """A checkpoint whose data domain is unknown here was reported as '--domain: unknown domain',
    a flag the user never gave, and export described it as an image folder."""
    data = {"domain": "xray", "image_size": 32, "options": {}, "normalization": None}
    _checkpoint(tmp_path / "ckpt.pt", arch="tiny", channels=3, small=True, data=data)
    for argv in (["embed", str(tmp_path / "ckpt.pt")], ["knn", "--checkpoint", str(tmp_path / "ckpt.pt")]):
        assert main(["-q", *argv, "--data", str(demo_images), "--out", str(tmp_path / "o")]) == 2
        assert capsys.readouterr().err.endswith(
            f"{tmp_path / 'ckpt.pt'}: data domain 'xray' is not one of this fedmoco's (images, medical, satellite); "
            "give --domain to read the data as one of them\n")
    assert main(["-q", "embed", str(tmp_path / "ckpt.pt"), "--data", str(demo_images), "--domain", "images",
                 "--out", str(tmp_path / "e")]) == 0
    from fedmoco.export import preprocessing

    assert "scaling" not in preprocessing(data, 3) and "not one of this fedmoco's" in preprocessing(data, 3)["note"]


def test_embed_with_another_domain_leaves_the_checkpoints_options_behind(tmp_path, demo_images):
    # a medical checkpoint's ct_window means nothing to an image folder, as for knn and finetune
    _checkpoint(tmp_path / "ckpt.pt", arch="tiny", channels=1, small=True, data=MEDICAL)
    assert main(["-q", "embed", str(tmp_path / "ckpt.pt"), "--data", str(demo_images), "--domain", "images",
                 "--data-option", "channels=1", "--out", str(tmp_path / "e")]) == 0
    assert np.load(tmp_path / "e.npy").shape == (48, 128)


def _round(r, loss):
    site = {"node": 1234567, "status": "accepted", "train-loss": loss, "dp-keys-epsilon": 0.5 * r,
            "up-arrays": 2048, "up-keys": 512, "weights": 2048, "queue": 256}
    return {"event": "round", "round": r, "train-loss": loss, "pos-mean": 0.9, "neg-mean": 0.1,
            "emb-std": 0.08, "sites": [site]}


def test_plot_takes_a_federation_server_out_dir(tmp_path, capsys):
    server = tmp_path / "server"
    server.mkdir()
    (server / "rounds.jsonl").write_text("".join(json.dumps(_round(r, 5.0 - r)) + "\n" for r in (1, 2, 3)))
    assert main(["plot", str(server)]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(p.rsplit("/", 1)[-1] for p in printed) == ["loss.png", "privacy.png", "scores.png", "traffic.png"]
    for p in printed:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_names_the_folder_when_it_holds_neither_metrics_file(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(tmp_path) in err and "rounds.jsonl" in err and len(err.splitlines()) == 1


def test_readme_torchvision_snippet_runs_on_an_export(tmp_path, monkeypatch):
    """The README's "Take the encoder elsewhere" code, word for word, on a resnet18 export."""
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("### Take the encoder elsewhere"):]
    code = section[section.index("```python") + len("```python"):]
    code = code[:code.index("```")]
    reference = _checkpoint(tmp_path / "ckpt.pt", arch="resnet18", channels=1, small=True)
    assert main(["export", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "hospitals-encoder")]) == 0
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert isinstance(scope["encoder"], torchvision.models.ResNet)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scope["encoder"](x), reference(x), rtol=1e-5, atol=1e-5)
    assert scope["features"].shape == (1, 512)


def test_embed_names_satellite_tiles_by_their_window(tmp_path):
    from domains.satellite.demo import make_demo_archive

    data = make_demo_archive(tmp_path / "eo", labelled=True, seed=0)
    data_meta = {"domain": "satellite", "image_size": 32, "options": {}, "normalization": None}
    _checkpoint(tmp_path / "ckpt.pt", arch="tiny", channels=4, small=True, data=data_meta)
    assert main(["-q", "embed", str(tmp_path / "ckpt.pt"), "--data", str(data), "--out", str(tmp_path / "e")]) == 0
    with open(tmp_path / "e.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == np.load(tmp_path / "e.npy").shape[0] > 0
    assert all(r["region"].startswith("window=") and len(r["region"].split(",")) == 4 for r in rows)
    assert all((data / r["path"]).is_file() for r in rows)


def test_embed_names_a_linked_file_by_its_place_in_the_folder(tmp_path):
    from fedmoco.embed import _relative

    elsewhere = tmp_path / "elsewhere" / "cat.png"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"x")
    root = tmp_path / "data"
    (root / "cats").mkdir(parents=True)
    (root / "cats" / "link.png").symlink_to(elsewhere)
    assert _relative(root / "cats" / "link.png", root) == "cats/link.png"
    assert _relative((root / "cats" / "link.png").resolve(), root) == str(elsewhere)  # not under root at all


def test_embed_reads_linked_files_and_checks_its_outputs_first(tmp_path, demo_images, capsys):
    """A data folder of links into another store is embedded under the links' names (labels
    rows naming files outside --data are refused, and a link is under --data); an --out whose
    .csv is a folder is refused before any features are written, so no pair is half-replaced."""
    _checkpoint(tmp_path / "ckpt.pt", arch="tiny", channels=3, small=True)
    root = tmp_path / "links" / "circle"
    root.mkdir(parents=True)
    for f in sorted((demo_images / "circle").glob("*.png"))[:3]:
        (root / f.name).symlink_to(f)
    assert main(["-q", "embed", str(tmp_path / "ckpt.pt"), "--data", str(tmp_path / "links"),
                 "--out", str(tmp_path / "e")]) == 0
    with open(tmp_path / "e.csv") as fh:
        assert [r["path"] for r in csv.DictReader(fh)] == [f"circle/circle_00{i}.png" for i in range(3)]
    (tmp_path / "f.csv").mkdir()
    assert main(["-q", "embed", str(tmp_path / "ckpt.pt"), "--data", str(tmp_path / "links"),
                 "--out", str(tmp_path / "f")]) == 2
    assert capsys.readouterr().err == (f"fedmoco embed: error: {tmp_path / 'f.csv'}: is a folder; give --out a path "
                                       "whose .npy and .csv are free or files\n")
    assert not (tmp_path / "f.npy").exists()
    assert main(["-q", "knn", "--checkpoint", str(tmp_path), "--data", str(demo_images)]) == 2
    assert capsys.readouterr().err == (f"fedmoco knn: error: {tmp_path}: is a folder, not a checkpoint file\n")


def test_embed_takes_a_file_name_that_is_not_utf8_and_writes_its_bytes(tmp_path, demo_images):
    # the internal labels CSV raised UnicodeEncodeError (a traceback) on a Latin-1 file name
    import os
    import shutil

    _checkpoint(tmp_path / "ckpt.pt", arch="tiny", channels=3, small=True)
    data = tmp_path / "data"
    shutil.copytree(demo_images, data)
    first = sorted((data / "circle").glob("*.png"))[0]
    os.rename(os.fsencode(first), os.fsencode(first.parent) + b"/caf\xe9.png")
    assert main(["-q", "embed", str(tmp_path / "ckpt.pt"), "--data", str(data),
                 "--out", str(tmp_path / "emb" / "features.npy")]) == 0
    assert np.load(tmp_path / "emb" / "features.npy").shape[0] == len(list(demo_images.rglob("*.png")))
    assert b"circle/caf\xe9.png" in (tmp_path / "emb" / "features.csv").read_bytes()


def test_the_recorded_geometry_is_the_evaluation_views(tmp_path):
    """encoder.json is how a user reproduces the encoder's input elsewhere. Followed as written
    it must give the evaluation view: the medical record left out the centre square and the
    area/bilinear resize (features 1.6% off), the images record put /255 before the resize
    (found by an audit). Each record's words are implemented here with plain torch."""
    import torch.nn.functional as F
    import torchvision.transforms.v2.functional as TF

    from domains.images.dataset import eval_transform
    from domains.medical.options import MedicalOptions
    from domains.medical.transforms import eval_pipeline
    from fedmoco.data import Normalization
    from fedmoco.export import preprocessing

    med = preprocessing({"domain": "medical", "options": {}}, 1)
    assert med["resize"].startswith("largest centred square") and "area" in med["resize"]
    g = torch.Generator().manual_seed(0)
    for h, w, size in ((80, 60, 32), (20, 30, 32)):  # shrink (area) and enlarge (bilinear)
        img = torch.rand(1, h, w, generator=g)
        side = min(h, w)
        square = img[:, (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
        mode = "area" if side >= size else "bilinear"
        by_words = F.interpolate(square[None], size=(size, size), mode=mode,
                                 **({} if mode == "area" else {"align_corners": False}))[0]
        pipe = eval_pipeline(MedicalOptions(), size)
        view = pipe.transforms[1:]  # the geometry after windowing (the record's "windowing" covers the first)
        out = {"image": img}
        for t in view:
            out = t(out)
        torch.testing.assert_close(torch.as_tensor(out["image"]), by_words, rtol=0, atol=1e-6)

    words = preprocessing({"domain": "images", "options": {}}, 3)["scaling"]
    assert words.index("short side") < words.index("/ 255")
    u8 = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8, generator=g)
    by_words = TF.center_crop(TF.resize(u8, [24], antialias=True), [24, 24]).float() / 255
    ours = eval_transform(24, Normalization((0.0,) * 3, (1.0,) * 3))(u8)
    torch.testing.assert_close(ours, by_words, rtol=0, atol=1e-6)


def test_the_records_other_steps_are_what_the_pipelines_do(tmp_path):
    """Followed literally, encoder.json missed nodata filling, the satellite resize, EXIF, the
    16-bit stretch, the colour-to-luma rule and the per-frame rescale (found by an audit). Its
    words for the images' luma are checked here against load_image, by hand."""
    from PIL import Image

    from domains.images.dataset import load_image
    from fedmoco.export import preprocessing

    sat = preprocessing({"domain": "satellite", "options": {}}, 4)
    assert "band's mean" in sat["nodata"] and "v2.Resize" in sat["resize"]
    med = preprocessing({"domain": "medical", "options": {}}, 1)
    assert "per frame" in med["windowing"]["value"]
    gray = preprocessing({"domain": "images", "options": {}}, 1)["decoding"]
    assert "299/1000 R + 587/1000 G + 114/1000 B" in gray and "EXIF" in gray
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    by_words = (r * 299 + g * 587 + b * 114 + 500) // 1000  # PIL rounds to nearest
    assert np.abs(load_image(tmp_path / "c.png", 1)[0].numpy().astype(np.int64) - by_words).max() <= 1
