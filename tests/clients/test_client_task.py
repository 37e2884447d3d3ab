"""clients.task: the run_config schema both sides read, and the shared part of the model."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from clients.task import (RUN_DEFAULTS, is_shared, moco_config, parse_channels, parse_options, run_value,
                          shared_state, site_data_path, train_config)
from fedmoco.errors import ConfigError
from fedmoco.moco import MoCo

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_pyproject_run_config_matches_the_defaults():
    # `flwr run --run-config` only overrides keys pyproject declares, and run_simulation
    # passes none at all: the two tables must agree key by key and value by value.
    declared = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert declared == RUN_DEFAULTS


def test_run_value_coerces_and_names_the_key():
    assert run_value({"num-server-rounds": "5"}, "num-server-rounds") == 5
    assert run_value({"lr": 1}, "lr") == 1.0 and isinstance(run_value({"lr": 1}, "lr"), float)
    assert run_value({"mlp": "false"}, "mlp") is False
    assert run_value({}, "arch") == "tiny"
    with pytest.raises(ConfigError, match="run_config batch-size: expected int, got 'many'"):
        run_value({"batch-size": "many"}, "batch-size")
    with pytest.raises(ConfigError, match="local-epochs"):
        run_value({"local-epochs": 1.5}, "local-epochs")
    with pytest.raises(KeyError):
        run_value({}, "no-such-key")


def test_configs_from_run_config():
    m = moco_config({"dim": 32, "local-queue-size": 256, "norm": "group"})
    assert (m.dim, m.queue_size, m.norm, m.arch) == (32, 256, "group", "tiny")
    t = train_config({"local-epochs": 2, "max-steps-per-epoch": 0})
    assert t.epochs == 2 and t.max_steps_per_epoch is None and t.amp and t.channels_last  # CUDA only
    with pytest.raises(ConfigError, match="temperature"):
        moco_config({"temperature": 0.0})


def test_parse_helpers():
    assert parse_options("window=brain, slices=3,flip=true,ratio=0.5") == {
        "window": "brain", "slices": 3, "flip": True, "ratio": 0.5}
    assert parse_options("") == {}
    with pytest.raises(ConfigError, match="key=value"):
        parse_options("justaword")
    # list values as the domain docs write them: a node_config could not select bands or
    # modalities at all (found by an audit)
    assert parse_options("bands=B02,B03,B04,B08,sampling=grid") == {"bands": "B02,B03,B04,B08", "sampling": "grid"}
    assert parse_options("modalities=CT,CR") == {"modalities": "CT,CR"}
    assert parse_options("band_roles=red=B04,nir=B08; indices=ndvi,ndwi") == {
        "band_roles": "red=B04,nir=B08", "indices": "ndvi,ndwi"}
    from domains.satellite.options import parse_options as satellite_options

    opts = satellite_options(parse_options("bands=B02,B03,B04,B08,indices=ndvi,ndwi"))
    assert opts.bands == ("B02", "B03", "B04", "B08") and opts.indices == ("ndvi", "ndwi")
    assert parse_channels("0.5", 3, "input-mean") == [0.5, 0.5, 0.5]
    assert parse_channels("", 3, "input-mean") is None
    with pytest.raises(ConfigError, match="2 values for 4 channels"):
        parse_channels("0.1,0.2", 4, "input-std")


def test_site_data_path(tmp_path):
    assert site_data_path({"data-path": "/data/a"}, {}) == Path("/data/a")
    assert site_data_path({"partition-id": 2}, {"demo-root": str(tmp_path)}) == tmp_path / "site-2"
    with pytest.raises(ConfigError, match="data-path"):
        site_data_path({"partition-id": 2}, {})


def test_shared_part_is_query_encoder_head_and_predictor_without_counters():
    model = MoCo(moco_config({"norm": "batch", "predictor": True, "dim": 8, "hidden-dim": 16}))
    names = list(shared_state(model))
    assert names and all(n.startswith(("encoder_q.", "predictor.")) for n in names)
    assert any(n.startswith("encoder_q.head.") for n in names) and any(n.startswith("predictor.") for n in names)
    assert not any(n.endswith("num_batches_tracked") for n in names)
    assert any(n.endswith("running_mean") for n in names)  # BN statistics are averaged with the weights
    assert not is_shared("encoder_k.head.0.weight") and not is_shared("queue.buffer")
    # a copy, not a view of the live parameters
    first = names[0]
    shared_state(model)[first].add_(1.0)
    assert not (shared_state(model)[first] == model.state_dict()[first] + 1).all()


def test_the_coordinator_cannot_choose_where_a_site_writes_nor_lift_its_file_limits(caplog):
    """run_config data-options may set augmentations, not a site's cache folder (decoded pixels
    and file paths) or the per-file limits guarding its memory: those are left out and logged.
    A site's own node_config data-options are taken whole."""
    import logging

    from clients.task import SITE_ONLY_OPTIONS, site_options

    run = {"data-options": "crop_scale=0.8,cache_dir=/tmp/coordinator-chosen,max_decoded_mb=1e9,max_pixels=9e18"}
    with caplog.at_level(logging.WARNING, logger="flwr.fedmoco.client"):
        assert site_options({}, run) == {"crop_scale": 0.8}
    assert ("run_config data-options cache_dir, max_decoded_mb, max_pixels ignored: only the site's node_config "
            "data-options may set them") in caplog.text
    own = {"data-options": "cache_dir=/var/cache/site-a,max_decoded_mb=512"}
    assert site_options(own, run) == {"cache_dir": "/var/cache/site-a", "max_decoded_mb": 512}
    assert {"cache_dir", "cache_max_gb", "max_raster_pixels", "max_frame_pixels"} <= SITE_ONLY_OPTIONS
    # every name is an option some domain has (a typo here would leave a limit open)
    import dataclasses

    from domains.images.dataset import OPTIONS
    from domains.medical.options import MedicalOptions
    from domains.satellite.options import SatelliteOptions

    known = {f.name for f in dataclasses.fields(MedicalOptions)} | {f.name for f in dataclasses.fields(SatelliteOptions)}
    assert SITE_ONLY_OPTIONS <= known | set(OPTIONS)
    # every limit of a file's size is the site's: a domain option named max_* is in the set
    assert {n for n in known | set(OPTIONS) if n.startswith("max_") and n not in ("max_nodata", "max_tries")} \
        <= SITE_ONLY_OPTIONS


def test_the_coordinator_cannot_lift_a_limit_by_spelling_it_with_dashes(caplog):
    # the satellite parser reads "-" as "_": "max-raster-pixels" got past the filter
    from clients.task import site_options
    from domains.satellite.options import parse_options as satellite_options

    run = {"data-options": "max-raster-pixels=9e18,GDAL-CACHE-MB=99999, max-compression-ratio=1e9,cache-max-gb=1e6,"
                           "tile-size=32"}
    kept = site_options({}, run)
    assert kept == {"tile-size": 32}
    assert satellite_options(kept).max_raster_pixels == satellite_options({}).max_raster_pixels


def test_a_queue_no_site_could_hold_is_refused_before_the_round():
    # each range alone allowed 2^20 keys of 8192 dims (32 GiB) at every site
    from clients.task import RUN_DEFAULTS, check_run_ranges

    check_run_ranges({**RUN_DEFAULTS, "local-queue-size": 65536, "dim": 1024})  # 256 MiB: the most
    with pytest.raises(ConfigError, match=r"run_config local-queue-size x dim \(1048576 x 8192 float32\) would take "
                                          r"32,768 MiB; at most 256 MiB"):
        check_run_ranges({**RUN_DEFAULTS, "local-queue-size": 2**20, "dim": 8192})
    with pytest.raises(ConfigError, match=r"run_config global-queue-size x dim \(1048576 x 512 float32\) would "
                                          r"take 2,048 MiB; at most 1024 MiB"):
        check_run_ranges({**RUN_DEFAULTS, "global-queue-size": 2**20, "dim": 512})
