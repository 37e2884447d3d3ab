"""``fedmoco check-site``: what a site admin sees before joining, checked on generated archives."""

from __future__ import annotations

import json

import pytest

from fedmoco.cli import main
from fedmoco.site_check import FEDERATION_DEFAULTS, check_site


@pytest.fixture(scope="module")
def hospital(tmp_path_factory):
    """A generated hospital archive: 28 usable CT/CR frames of 32 px in 23 files, and 4 broken or
    non-image files (2 without pixel data, 1 not DICOM, 1 truncated)."""
    from domains.medical.demo import make_demo_archive

    return make_demo_archive(tmp_path_factory.mktemp("hospital"), image_size=32)


def test_report_of_a_hospital_archive(hospital, capsys):
    rc = main(["-q", "check-site", "--domain", "medical", "--data", str(hospital), "--image-size", "32",
               "--batch-size", "8", "--steps", "2", "--device", "cpu"])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"site check: medical data in {hospital}"
    assert lines[1].startswith("usable images:   28; medical: 28 samples from 23 DICOM files")
    assert lines[2] == "skipped files:   skipped 4 files: 2 no pixel data, 1 not DICOM, 1 truncated pixel data"
    assert lines[3] == "channels:        1"
    assert lines[4] == "image sizes:     32 x 32 (23 files)"
    assert lines[5] == "input size:      32 x 32 px (run_config image-size)"
    assert lines[6].startswith("time per step:   ") and "on cpu (batch 8, mean of 2 timed steps" in lines[6]
    assert lines[7].startswith("time per epoch:  about ") and lines[7].endswith("(3 steps of 8 images)")


def test_expected_epoch_is_steps_times_measured_step(hospital):
    report = check_site("medical", hospital, image_size=32, batch_size=8, steps=1)
    assert (report.usable, report.steps_per_epoch, report.steps_timed) == (28, 3, 1)  # 28 // 8 full batches
    assert report.seconds_per_step > 0
    assert report.seconds_per_epoch == pytest.approx(3 * report.seconds_per_step)


def test_one_step_is_singular(hospital):
    report = check_site("medical", hospital, image_size=32, batch_size=16, steps=1)
    lines = report.lines()
    assert report.steps_per_epoch == 1  # 28 // 16 full batches
    assert any("mean of 1 timed step, reading" in line for line in lines)
    assert any(line.endswith("(1 step of 16 images)") for line in lines)


def test_no_timing_with_zero_steps(hospital):
    report = check_site("medical", hospital, image_size=32, steps=0)
    assert report.steps_timed == 0 and not any(line.startswith("time per") for line in report.lines())


def test_too_few_images_is_one_line(tmp_path, capsys):
    from domains.images import make_demo_images

    one = tmp_path / "one"
    make_demo_images(tmp_path / "demo", n_per_class=1, size=16, seed=0)
    (one / "a").mkdir(parents=True)
    first = sorted((tmp_path / "demo").rglob("*.png"))[0]
    (one / "a" / first.name).write_bytes(first.read_bytes())
    assert main(["-q", "check-site", "--domain", "images", "--data", str(one)]) == 2
    err = capsys.readouterr().err
    assert err == f"fedmoco check-site: error: {one}: 1 usable image(s); MoCo needs at least 2\n"
    assert main(["-q", "check-site", "--domain", "images", "--data", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err == f"fedmoco check-site: error: {tmp_path / 'missing'}: data folder does not exist\n"


def test_a_folder_whose_images_do_not_decode_is_not_called_usable(tmp_path, capsys):
    """1 good PNG and 7 cut in half: their headers read, so check-site said 'usable images: 8'
    and exited 0, where pretrain trains nothing (found by an audit). The timed steps decode."""
    from domains.images import make_demo_images

    make_demo_images(tmp_path / "demo", n_per_class=2, size=16, seed=0)
    site = tmp_path / "site" / "a"
    site.mkdir(parents=True)
    files = sorted((tmp_path / "demo").rglob("*.png"))
    for i, f in enumerate(files):
        data = f.read_bytes()
        (site / f"{i}.png").write_bytes(data if i == 0 else data[: len(data) // 2])
    assert main(["-q", "check-site", "--domain", "images", "--data", str(site.parent), "--steps", "2",
                 "--batch-size", "4"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after one warning per file that failed to decode
    assert last.startswith(f"fedmoco check-site: error: {site.parent}: no batch read while timing had 2 readable "
                           "images (") and last.endswith("a round would train nothing")


def test_defaults_are_the_federations():
    from clients.task import RUN_DEFAULTS

    assert FEDERATION_DEFAULTS == {k: RUN_DEFAULTS[k] for k in FEDERATION_DEFAULTS}


@pytest.fixture
def images_site(tmp_path):
    """A small images-domain site folder (8 usable images) and a state folder beside it."""
    from domains.images import make_demo_images

    make_demo_images(tmp_path / "data", n_per_class=2, size=16, seed=0)
    return tmp_path / "data"


def _privacy(report):
    return [line for line in report.lines() if line.split(":")[0] in ("privacy", "budget", "ledger")]


def test_privacy_lines_without_a_settings_file(images_site):
    lines = _privacy(check_site("images", images_site, image_size=16, steps=0))
    assert lines == ["privacy:         no fedmoco-site.toml here: unless node_config sets dp-epsilon and a ledger "
                     "(ledger-path or state-dir), this site sends weights and metrics only"]


def test_privacy_lines_read_the_settings_file_and_the_ledger(images_site, tmp_path):
    from fedmoco.ledger import SiteLedger
    from fedmoco.site_settings import LEDGER_FILE

    (images_site / "fedmoco-site.toml").write_text('dp-epsilon = 8\ndp-delta = 1e-5\ndp-rounds = 10\n'
                                                   'state-dir = "../state"\n')
    lines = _privacy(check_site("images", images_site, image_size=16, steps=0))
    assert lines[1] == "budget:          epsilon 8, delta 1e-05, planned over 10 releases"
    ledger = (images_site / ".." / "state" / LEDGER_FILE)
    assert lines[2] == f"ledger:          {ledger} (none yet: the first release creates it)"
    # After two releases the report shows what they spent, as the accountant computes it.
    book = SiteLedger("prototypes", 8.0, 1e-5, 10)
    book.record(3.0, 1.0)
    book.record(3.0, 1.0)
    ledger.parent.mkdir()
    ledger.write_text(json.dumps(book.state_dict()))
    spent = book.spent()
    assert _privacy(check_site("images", images_site, image_size=16, steps=0))[2] == (
        f"ledger:          {ledger}: prototypes, spent epsilon {spent:.3g} of 8 (delta 1e-05) in "
        f"{book.releases} of 10 planned releases")


def test_a_site_with_a_budget_is_told_what_a_release_would_read(images_site, tmp_path):
    """check-site tells the admin of an images site that it will share only once the
    federation fixes input-mean/input-std, and how many records a release reads."""
    (images_site / "fedmoco-site.toml").write_text('dp-epsilon = 8\nstate-dir = "../state-r"\n')
    report = check_site("images", images_site, image_size=16, steps=0)
    release = [line for line in report.lines() if line.startswith("release:")]
    assert release == [f"release:         one item per record, {report.usable} records; refused (dp-status 9) unless "
                       "the federation fixes run_config input-mean and input-std (this domain normalises with the "
                       "site's own statistics)"]


def test_a_removed_ledger_is_reported_as_the_round_will_refuse_it(images_site, capsys):
    """check-site reads a marked lock without its ledger as a round does: one line, exit 2."""
    from fedmoco.ledger import LOCK_NOTE

    state = images_site.parent / "state-gone"
    state.mkdir()
    (state / "privacy-ledger.json.lock").write_text(LOCK_NOTE)  # a ledger was written here once
    (images_site / "fedmoco-site.toml").write_text('dp-epsilon = 8\nstate-dir = "../state-gone"\n')
    assert main(["-q", "check-site", "--domain", "images", "--data", str(images_site), "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "the privacy ledger is missing but its lock file privacy-ledger.json.lock says one was written" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("text, message", [
    ('dp-epsilon = 8\nledger-path = "ledger.json"\n',
     '{file}: ledger-path: "{data}/ledger.json" is inside the data folder'),
    ('dp-epsilon = 8\ndp-delta = 0.5\nstate-dir = "../s"\n', "{file}: dp-delta: must be in (0, 0.001], got 0.5"),
    ('dp-epsilon = -1\n', "{file}: dp-epsilon: must be > 0, got -1"),
    ('epsilon = 8\n', "{file}: epsilon: not a site setting"),
    ('site-name = "hospital a/../b"\n', "{file}: site-name: 'hospital a/../b' is not a site name: 1 to 32 characters"),
    # a number for a path was read as a relative path and reported as inside the data folder
    ('dp-epsilon = 8\nledger-path = 5\n', "{file}: ledger-path: expected a quoted string, got int 5"),
])
def test_a_settings_file_a_round_would_refuse_is_one_line(images_site, capsys, text, message):
    file = images_site / "fedmoco-site.toml"
    file.write_text(text)
    assert main(["-q", "check-site", "--domain", "images", "--data", str(images_site), "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedmoco check-site: error: " + message.format(file=file, data=images_site))
    assert err.count("\n") == 1


def test_an_image_site_with_a_forged_header_reports_it_as_skipped(images_site, capsys):
    """check-site on an image folder counts what a round would refuse from the headers: a forged
    65535^2 PNG and a file that is no image, by reason, and exits 0 (the rest is usable)."""
    from forged_files import forged_png

    forged_png(images_site / "circle" / "bomb.png", 65535, 65535)
    (images_site / "circle" / "notes.png").write_bytes(b"hello")
    assert main(["-q", "check-site", "--domain", "images", "--data", str(images_site), "--steps", "0"]) == 0
    out = capsys.readouterr().out
    assert "usable images:   8; 10 images under" in out
    assert "skipped files:   skipped 2 files: 1 declared size over max_pixels, 1 not an image" in out
    assert "image sizes:     16 x 16 (8 files)" in out


def test_a_cache_that_would_not_fit_is_named_as_such(hospital, tmp_path, monkeypatch):
    """A round builds no sample cache when it would leave less than FEDMOCO_CACHE_MIN_FREE_GB
    free: check-site says so, with the free space and the setting, instead of promising a cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEDMOCO_CACHE_DIR", str(cache))
    monkeypatch.setattr("fedmoco.cache._free_bytes", lambda folder: 3 * 10**9)
    monkeypatch.setenv("FEDMOCO_CACHE_MIN_FREE_GB", "2.5")
    roomy = check_site("medical", hospital, image_size=32, steps=0)
    assert roomy.cache_fits and roomy.cache_free == 3 * 10**9
    monkeypatch.setenv("FEDMOCO_CACHE_MIN_FREE_GB", "3")
    tight = check_site("medical", hospital, image_size=32, steps=0)
    assert not tight.cache_fits and tight.cache_bytes == roomy.cache_bytes > 0
    line = next(x for x in tight.lines() if x.startswith("cache:"))
    assert line == (f"cache:           this check wrote nothing; a round would need about "
                    f"{tight.cache_bytes / 1e6:.1f} MB in {cache} but only 3.0 GB is free and 3.0 GB is kept free "
                    "(FEDMOCO_CACHE_MIN_FREE_GB), so every read decodes its image: free disk there, or point "
                    "FEDMOCO_CACHE_DIR at a larger volume")
    # a round's cache of this folder already on disk is replaced or reused: its blocks count as free
    from fedmoco.data import DataConfig, build_pretrain_data

    monkeypatch.setenv("FEDMOCO_CACHE_MIN_FREE_GB", "0")
    data = build_pretrain_data("medical", hospital, DataConfig(image_size=32))
    for i in range(len(data.dataset)):  # a round's first epoch fills the cache
        data.dataset[i]
    monkeypatch.setenv("FEDMOCO_CACHE_MIN_FREE_GB", "3")
    again = check_site("medical", hospital, image_size=32, steps=0)
    assert again.cache_fits and again.cache_bytes == tight.cache_bytes


def test_a_cache_folder_a_round_cannot_write_is_named_as_such(hospital, tmp_path, monkeypatch):
    """FEDMOCO_CACHE_DIR naming a file (or a folder this user cannot write) leaves a round
    without a cache; check-site said a round would decode into it."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("FEDMOCO_CACHE_DIR", str(blocker))
    report = check_site("medical", hospital, image_size=32, steps=0)
    line = next(x for x in report.lines() if x.startswith("cache:"))
    assert line == (f"cache:           this check wrote nothing; a round cannot write its decoded-sample cache "
                    f"there: {blocker} is not a folder, so every read decodes its image: point FEDMOCO_CACHE_DIR "
                    "at a folder this user can write")
    monkeypatch.setattr("os.access", lambda path, mode: False)  # as on a read-only volume, or another user's
    monkeypatch.setenv("FEDMOCO_CACHE_DIR", str(tmp_path / "c" / "d"))
    report = check_site("medical", hospital, image_size=32, steps=0)
    assert report.cache_problem == f"{tmp_path} cannot be written by this user"


@pytest.mark.parametrize("domain", ["medical", "satellite", "images"])
def test_the_dry_run_writes_nothing(domain, hospital, images_site, tmp_path, monkeypatch):
    """check-site is a dry run: no decoded-sample cache (a satellite archive's can take up to
    cache_max_gb and minutes to fill), no header index, no statistics memo. It says where a
    round will cache, and times the steps as a first epoch runs them (decoding included)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEDMOCO_CACHE_DIR", str(cache))
    if domain == "satellite":
        from domains.satellite.demo import make_demo_archive

        folder = make_demo_archive(tmp_path / "sat", bands=4, seed=0)
    else:
        folder = hospital if domain == "medical" else images_site
    report = check_site(domain, folder, image_size=32, batch_size=4, steps=1)
    assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*"))
    assert "reading, decoding and augmentation included, as in a round's first pass" in report.lines()[6]
    line = next(x for x in report.lines() if x.startswith("cache:"))
    off = ("cache:           this check wrote nothing; every read decodes its image (no decoded-sample cache in "
           "this domain, or the cache option is off)")
    if domain == "images":  # no decoded-sample cache in this domain
        assert line == off
        return
    site_off = check_site(domain, folder, image_size=32, steps=0, options={"cache": "false"})
    assert next(x for x in site_off.lines() if x.startswith("cache:")) == off
    assert line.startswith(f"cache:           this check wrote nothing; a round decodes the images once into {cache}: "
                           "about ")
    # the estimate is what a round then writes, to the byte
    from fedmoco.cache import cache_usage
    from fedmoco.data import DataConfig, build_pretrain_data

    build_pretrain_data(domain, folder, DataConfig(image_size=32))
    written = sum(p.stat().st_size for p in cache_usage(cache).files if p.suffix == ".cache")
    assert written == report.cache_bytes > 0
    if domain == "satellite":  # rasters over cache_max_gb are named as read from disk
        tight = check_site(domain, folder, image_size=32, steps=0, options={"cache_max_gb": 1e-6})
        rasters = sum(tight.source_sizes.values())
        assert tight.cache_bytes == 0 and tight.cache_skipped == rasters > 0
        line = next(x for x in tight.lines() if x.startswith("cache:"))
        assert line.endswith(f"about 0.0 MB on disk (pixels only); {rasters} raster(s) over cache_max_gb are read "
                             "from disk every time")


def test_a_malformed_cache_option_is_the_domains_one_line_error(tmp_path, capsys):
    """check-site turns its own cache off, but a value the site's options would refuse is still
    refused, in the domain's words, before anything is read or written."""
    from domains.satellite.demo import make_demo_archive

    folder = make_demo_archive(tmp_path / "sat", bands=4, seed=0)
    rc = main(["-q", "check-site", "--domain", "satellite", "--data", str(folder), "--data-option", "cache=maybe",
               "--steps", "0"])
    assert rc == 2
    assert "satellite data option cache='maybe': expected true or false" in capsys.readouterr().err


def test_delta_is_checked_per_record_as_a_round_checks_it(tmp_path):
    """A satellite site's record is a raster: a delta of 1e-3 suits its few rasters even when an
    epoch draws 2,000 tiles, in the dry run as in a round (which checks the records a release reads)."""
    from domains.satellite import make_demo_archive

    site = make_demo_archive(tmp_path / "sat", bands=4, seed=0, tile_size=32)
    (site / "fedmoco-site.toml").write_text('dp-epsilon = 8\ndp-delta = 1e-3\nstate-dir = "../state"\n')
    report = check_site("satellite", site, options={"samples_per_epoch": 2000}, image_size=32, steps=0)
    assert report.usable == 2000
    assert [line for line in report.lines() if line.startswith("release:")] == [
        # the 8 four-band rasters the scan reads (an all-nodata one among them gives no item)
        "release:         one item per record, 8 records; refused (dp-status 9) unless the federation fixes "
        "run_config input-mean and input-std (this domain normalises with the site's own statistics)"]


def test_a_medical_site_stacking_slices_is_told_it_will_not_share(tmp_path):
    """slices > 1 puts one file in several samples: whatever the federation sets, the site
    refuses to release (dp-status 9), and check-site says so before the site joins."""
    from domains.medical import make_demo_archive

    site = make_demo_archive(tmp_path / "ct", n_patients=2, seed=0, image_size=32)
    (site / "fedmoco-site.toml").write_text('dp-epsilon = 8\nstate-dir = "../state"\n')
    report = check_site("medical", site, options={"slices": 3}, image_size=32, steps=0)
    assert [line for line in report.lines() if line.startswith("release:")] == [
        "release:         refused (dp-status 9) whatever the federation sets: medical option slices=3 stacks "
        "neighbouring slice files into each sample, so one file moves up to 3 summaries"]
    from fedmoco.data import DataConfig, build_pretrain_data

    plain = check_site("medical", site, image_size=32, steps=0)
    data = build_pretrain_data("medical", site, DataConfig(image_size=32, cache=False, progress=False))
    files = len({int(f) for f in data.dataset.samples[:, 0, 0]})  # readable files (the archive holds a broken one)
    assert files < plain.usable  # multi-frame files: fewer records than frames
    assert [line for line in plain.lines() if line.startswith("release:")] == [
        f"release:         one item per record, {files} records"]


def test_timing_steps_when_the_views_are_made_on_the_training_device(hospital, monkeypatch):
    # On a GPU the loader yields cached bases (BaseCollate) and the Trainer makes the views,
    # from the collate it finds on the loader; check-site times one batch at a time, so that
    # batch must carry the collate (it was a bare list: "'list' object has no attribute
    # 'collate_fn'" on every GPU machine). Here the GPU's loader is built on the CPU.
    import fedmoco.train as train

    offered = train.batched_views_for

    def as_on_a_gpu(dataset, cfg, device):
        found = offered(dataset, cfg, device)
        return None if found is None else (found[0], train.BaseCollate(found[1].views))

    monkeypatch.setattr(train, "batched_views_for", as_on_a_gpu)
    report = check_site("medical", hospital, image_size=32, batch_size=8, steps=1)
    assert report.steps_timed == 1 and report.seconds_per_step > 0


def test_a_cache_folder_inside_the_data_folder_is_refused_as_a_round_refuses_it(hospital, tmp_path, monkeypatch,
                                                                                capsys):
    # the dry run turns its cache off, and so skipped the check a round's first pass makes
    import shutil

    data = tmp_path / "data"
    shutil.copytree(hospital, data)
    monkeypatch.setenv("FEDMOCO_CACHE_DIR", str(data / "c"))
    assert main(["-q", "check-site", "--domain", "medical", "--data", str(data), "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert f"{data / 'c'}: the cache folder is inside the data folder {data}" in err and err.count("\n") == 1
    assert main(["-q", "check-site", "--domain", "medical", "--data", str(data), "--steps", "0",
                 "--data-option", "cache=false"]) == 0  # nothing would be written there


def test_no_noise_is_reported_as_a_round_decides_it(images_site, tmp_path):
    # dp-epsilon = inf releases without noise and needs no ledger; check-site said sharing was refused
    from fedmoco.ledger import SiteLedger
    from fedmoco.site_settings import LEDGER_FILE

    (images_site / "fedmoco-site.toml").write_text('dp-epsilon = inf\n')
    assert _privacy(check_site("images", images_site, image_size=16, steps=0))[-1] == (
        "ledger:          none needed: a round releases WITHOUT noise (dp-status 1), writes no ledger, and "
        "nothing it sends is private")
    (images_site / "fedmoco-site.toml").write_text('dp-epsilon = inf\nstate-dir = "../state"\n')
    ledger = images_site / ".." / "state" / LEDGER_FILE
    ledger.parent.mkdir()
    ledger.write_text(json.dumps(SiteLedger("prototypes", 8.0, 1e-5, 10).state_dict()))
    assert _privacy(check_site("images", images_site, image_size=16, steps=0))[-1] == (
        f"ledger:          {ledger} records this site's budget: a round refuses dp-epsilon=inf (dp-status 8) "
        "and the site sends weights only")
