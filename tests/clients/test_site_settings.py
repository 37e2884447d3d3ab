"""A site's own settings file, ``<data folder>/fedmoco-site.toml``: its budget, ledger and name.

Runs the real ClientApp handler. The file is what a simulated site has instead of a
node_config of its own; node_config wins over it key by key, run_config never sets the
budget, and the file is neither data nor sent.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from client_test_helpers import context, global_model, make_images_site, run_config, train_message

from clients.app import SITE_MISCONFIGURED, train
from clients.ledger import read_ledger
from clients.task import SITE_FILE_KEYS, read_site_file, shared_arrays, site_config
from fedmoco.data import SITE_SETTINGS_FILE, DataConfig, build_pretrain_data, list_files
from fedmoco.errors import ConfigError


@pytest.fixture(scope="module")
def sent():
    return shared_arrays(global_model(run_config()))


@pytest.fixture
def site(tmp_path) -> Path:
    """A fresh site per test (tests write its settings file): ``tmp/data`` beside ``tmp/state``."""
    return make_images_site(tmp_path / "data")


def write_settings(site: Path, text: str) -> Path:
    path = site / SITE_SETTINGS_FILE
    path.write_text(text)
    return path


def metrics(reply) -> dict[str, float]:
    assert not reply.has_error(), reply.error
    return dict(reply.content["metrics"])


# -- the file's budget is honoured; node_config wins key by key ---------------------------------
def test_the_files_budget_and_ledger_are_used(site, sent, tmp_path, caplog):
    # a relative ledger path is resolved against the file's folder, not the SuperNode's cwd
    write_settings(site, 'dp-epsilon = 4.0\ndp-delta = 1e-6\nledger-path = "../state/ledger.json"\n'
                         'site-name = "north-7"\n')
    with caplog.at_level(logging.INFO, logger="flwr.fedmoco.client"):
        reply = train(train_message(sent, 1), context({"data-path": str(site)}, run_config()))
    m = metrics(reply)
    assert m["dp-status"] == 0 and m["dp-keys-budget"] == 4.0 and m["dp-keys-delta"] == 1e-6
    assert m["dp-keys-releases"] == 1 and 0 < m["dp-keys-epsilon"] <= 4.0
    ledger = read_ledger(tmp_path / "state" / "ledger.json")  # outside the data folder
    assert ledger is not None and ledger.epsilon_budget == 4.0 and ledger.releases == 1
    assert reply.content["site"]["name"] == "north-7"
    assert "dp-delta, dp-epsilon, ledger-path, site-name" in caplog.text  # the admin sees what came from the file


def test_node_config_wins_over_the_file_key_by_key(site, sent, tmp_path):
    write_settings(site, f'dp-epsilon = 4.0\ndp-delta = 1e-6\nledger-path = "{tmp_path / "file-ledger.json"}"\n')
    node = {"data-path": str(site), "dp-epsilon": 2.0, "ledger-path": str(tmp_path / "node-ledger.json"),
            "dp-delta": " "}  # blank: unset, so the file's delta applies
    m = metrics(train(train_message(sent, 1), context(node, run_config())))
    assert m["dp-keys-budget"] == 2.0 and m["dp-keys-delta"] == 1e-6
    assert read_ledger(tmp_path / "node-ledger.json").epsilon_budget == 2.0
    assert not (tmp_path / "file-ledger.json").exists()
    own = site_config(node, site)
    assert own.label("dp-epsilon") == "node_config dp-epsilon"
    assert own.label("dp-delta") == f"{site / SITE_SETTINGS_FILE}: dp-delta" and own.from_file() == ["dp-delta"]


def test_a_node_config_state_dir_keeps_the_ledger_beside_it(site, sent, tmp_path):
    # the ledger's place comes from one source: node_config's state-dir beats the file's ledger-path
    write_settings(site, 'dp-epsilon = 4.0\nledger-path = "../file-ledger.json"\n')
    node = {"data-path": str(site), "state-dir": str(tmp_path / "state")}
    m = metrics(train(train_message(sent, 1), context(node, run_config())))
    assert m["dp-status"] == 0 and read_ledger(tmp_path / "state" / "privacy-ledger.json").epsilon_budget == 4.0
    assert not (tmp_path / "file-ledger.json").exists()
    # the other way round: the file's state-dir holds the state, node_config's ledger-path the ledger
    write_settings(site, 'dp-epsilon = 4.0\nstate-dir = "../file-state"\n')
    node = {"data-path": str(site), "ledger-path": str(tmp_path / "node-ledger.json")}
    metrics(train(train_message(sent, 1), context(node, run_config())))
    assert (tmp_path / "node-ledger.json").is_file() and not (tmp_path / "file-state" / "privacy-ledger.json").exists()
    assert any((tmp_path / "file-state").iterdir())  # the training state


def test_run_config_cannot_set_the_budget_beside_the_file(site, sent, tmp_path, caplog):
    write_settings(site, 'dp-epsilon = 1.0\nledger-path = "../ledger.json"\n')
    run = run_config(**{"dp-epsilon": 100.0, "dp-delta": 0.5})
    with caplog.at_level(logging.WARNING):
        m = metrics(train(train_message(sent, 1), context({"data-path": str(site)}, run)))
    assert m["dp-keys-budget"] == 1.0 and m["dp-keys-delta"] == 1e-5
    assert "run_config dp-epsilon, dp-delta ignored" in caplog.text


def test_a_tightened_file_budget_applies_to_the_existing_ledger(site, sent, tmp_path):
    write_settings(site, 'dp-epsilon = 8.0\nledger-path = "../ledger.json"\n')
    train(train_message(sent, 1), context({"data-path": str(site)}, run_config()))
    write_settings(site, 'dp-epsilon = 2.0\nledger-path = "../ledger.json"\n')
    m = metrics(train(train_message(sent, 2), context({"data-path": str(site)}, run_config())))
    assert m["dp-keys-budget"] == 2.0 and read_ledger(tmp_path / "ledger.json").epsilon_budget == 2.0


# -- refusals: one line naming the file and the key ----------------------------------------------
@pytest.mark.parametrize("text,message", [
    ('domain = "satellite"\n', ": domain: not a site setting; this file may set only dp-epsilon, dp-delta"),
    ('key-release = "keys"\n', ": key-release: not a site setting"),
    ('[budget]\ndp-epsilon = 1.0\n', ": budget: not a site setting"),
    ("dp-epsilon = true\n", ": dp-epsilon: expected a number or a string, got bool"),
    ("dp-epsilon = [1.0]\n", ": dp-epsilon: expected a number or a string, got list"),
    ("dp-epsilon = \n", ": cannot read the site settings file (Invalid value (at line 1, column 14))"),
])
def test_the_file_is_checked_when_read(tmp_path, text, message):
    path = write_settings(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        read_site_file(path)
    assert str(err.value).startswith(f"{path}{message}") and "\n" not in str(err.value)


@pytest.mark.parametrize("text,message", [
    ('dp-epsilon = "lots"\n', "dp-epsilon: expected a number, got 'lots'"),
    ("dp-epsilon = -1\n", "dp-epsilon: must be > 0, got -1"),
    ("dp-delta = 0.5\ndp-epsilon = 8.0\n", "dp-delta: must be in (0, 0.001], got 0.5 (e.g. 1e-5)"),
    ("dp-rounds = 2.5\n", "dp-rounds: expected a whole number, got 2.5"),
    ('site-name = "a b"\n', "site-name: 'a b' is not a site name"),
    ('ledger-path = "ledger.json"\n', "ledger-path: "),  # resolved into the data folder
    ('state-dir = "cache/state"\n', "state-dir: "),
    ('unknown = 1\n', "unknown: not a site setting"),
])
def test_a_bad_value_is_a_misconfigured_reply_naming_the_file_and_key(site, sent, tmp_path, caplog, text, message):
    if "ledger-path" not in text and "state-dir" not in text:
        text += 'ledger-path = "../ledger.json"\n'
    path = write_settings(site, text)
    with caplog.at_level(logging.ERROR, logger="flwr.fedmoco.client"):
        reply = train(train_message(sent, 1), context({"data-path": str(site)}, run_config()))
    assert reply.has_error() and reply.error.code == SITE_MISCONFIGURED
    assert f"configuration: <path>: {message}" in reply.error.reason  # the coordinator never learns the path
    assert f"{path}: {message}" in caplog.text  # the site's own log names the file
    assert not (tmp_path / "ledger.json").exists()  # nothing spent


def test_a_ledger_inside_the_data_folder_is_refused_wherever_it_is_set(site, sent):
    node = {"data-path": str(site), "dp-epsilon": 8.0, "ledger-path": str(site / "sub" / "ledger.json")}
    reply = train(train_message(sent, 1), context(node, run_config()))
    assert reply.has_error() and reply.error.code == SITE_MISCONFIGURED
    assert 'node_config ledger-path: "<path>" is inside the data folder' in reply.error.reason
    assert not (site / "sub").exists()
    # a state-dir under the data folder kept only '<path>' of its reason: the explanation was scrubbed
    node = {"data-path": str(site), "dp-epsilon": 8.0, "state-dir": str(site / "state")}
    reply = train(train_message(sent, 1), context(node, run_config()))
    assert reply.has_error() and reply.error.code == SITE_MISCONFIGURED
    assert reply.error.reason.endswith("is inside the data folder; keep the privacy ledger and the state folder "
                                       "outside it (docs: privacy.md)"), reply.error.reason
    assert str(site) not in reply.error.reason


def test_the_file_keys_are_the_site_owned_ones_only():
    assert SITE_FILE_KEYS == ("dp-epsilon", "dp-delta", "dp-rounds", "ledger-path", "state-dir", "site-name")


# -- the file is not data, and nothing of it is sent ----------------------------------------------
def _medical(root: Path) -> Path:
    from domains.medical.demo import make_demo_archive
    return make_demo_archive(root, n_patients=2, seed=0, image_size=32, n_slices=2)


def _satellite(root: Path) -> Path:
    from domains.satellite.demo import make_demo_archive
    return make_demo_archive(root, bands=4, seed=0, tile_size=16)


@pytest.mark.parametrize("domain,make,size", [("images", make_images_site, 32), ("medical", _medical, 32),
                                              ("satellite", _satellite, 16)])
def test_the_settings_file_is_not_indexed_nor_counted_as_skipped(tmp_path, domain, make, size):
    root = make(tmp_path / "site")
    cfg = DataConfig(image_size=size, seed=0, cache=False)
    before = build_pretrain_data(domain, root, cfg)
    write_settings(root, 'dp-epsilon = 8.0\nledger-path = "../ledger.json"\n')
    shutil.copy(root / SITE_SETTINGS_FILE, root / "nested-copy.toml")  # control: any other file is looked at
    after = build_pretrain_data(domain, root, cfg)
    assert len(after.dataset) == len(before.dataset)
    assert root / SITE_SETTINGS_FILE not in list_files(root) and root / "nested-copy.toml" in list_files(root)
    others = sum(after.skipped.values()) - sum(before.skipped.values())
    assert others == 1, after.skipped  # the copy only (images count it as another format)


def test_nothing_from_the_file_is_sent(site, sent, tmp_path):
    write_settings(site, 'dp-epsilon = 4.0\nledger-path = "../ledger.json"\n')
    reply = train(train_message(sent, 1), context({"data-path": str(site)}, run_config()))
    assert set(reply.content.keys()) == {"arrays", "keys", "metrics"}  # as with node_config: no record added
    # what leaves is the budget's numbers (dp-* metrics, as from node_config), never the file or its paths
    assert {k for k in reply.content["metrics"] if k.startswith("dp-")} >= {"dp-keys-budget", "dp-status"}
    assert not reply.content.config_records  # no text at all: no site-name was set, so no ``site`` record


def test_a_settings_file_with_a_bom_is_read_and_a_huge_one_is_not(tmp_path):
    path = tmp_path / SITE_SETTINGS_FILE
    path.write_bytes(b"\xef\xbb\xbf" + b"dp-epsilon = 4.0\n")  # Windows editors save one
    assert read_site_file(path) == {"dp-epsilon": 4.0}
    path.write_text("# " + "x" * 100_000 + "\ndp-epsilon = 4.0\n")
    with pytest.raises(ConfigError, match=r"the site settings file is 100,\d+ bytes; a settings file has a few lines"):
        read_site_file(path)


@pytest.mark.parametrize("over,message", [
    ({"dp-rounds": 1e400}, "node_config dp-rounds: expected a whole number"),
    ({"dp-rounds": 10**7}, "node_config dp-rounds: 10000000 is more than 100,000"),
    ({"ledger-path": "/tmp/a\0b.json"}, "node_config ledger-path: a path cannot hold a NUL character"),
])
def test_site_privacy_settings_that_no_ledger_can_take_are_one_line(tmp_path, over, message):
    from fedmoco.site_settings import privacy_settings

    with pytest.raises(ConfigError) as err:
        privacy_settings({"dp-epsilon": 4.0, **over}, tmp_path / "data")
    assert str(err.value).startswith(message)
