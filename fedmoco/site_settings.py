"""A site's own settings: node_config, completed by the settings file in its data folder.

The privacy budget, the ledger's place, the state folder and the site's name belong to the
site admin (docs/privacy.md). They come from node_config, else from
``<data-path>/fedmoco-site.toml`` (:data:`SITE_SETTINGS_FILE`), never from the
run's config. The ClientApp (clients/app.py) and ``fedmoco check-site`` read them with the
same functions, so the dry run refuses exactly what a real round would.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Mapping

from fedmoco.errors import ConfigError

#: A site's own settings (budget, ledger, name) at the top of its data folder: never data.
SITE_SETTINGS_FILE = "fedmoco-site.toml"

#: Where a site keeps its ledger inside ``state-dir`` when ``ledger-path`` is not set.
LEDGER_FILE = "privacy-ledger.json"
#: delta when a site sets only dp-epsilon.
DEFAULT_DELTA = 1e-5


#: A site name: short, letters, digits, ``.``, ``_`` and ``-`` only, so it can never be a
#: path (no separators; ``.`` and ``..`` refused) and prints safely in logs and plots.
SITE_NAME = re.compile(r"[A-Za-z0-9._-]{1,32}")
#: The record of a train reply that carries the site's name (docs/privacy.md).
SITE_RECORD = "site"


def check_site_name(name: Any, where: str = "node_config site-name") -> str:
    """``name`` if it is a valid site name (:data:`SITE_NAME`); ConfigError naming ``where``."""
    if not isinstance(name, str) or not SITE_NAME.fullmatch(name) or name in (".", ".."):
        raise ConfigError(f"{where}: {str(name)[:40]!r} is not a site name: 1 to 32 characters of "
                          "A-Z a-z 0-9 . _ - (not . or ..)")
    return name


def site_name(node_config: Mapping[str, Any]) -> str | None:
    """The site's name: ``site-name`` (node_config or, in a :class:`SiteConfig`, the site's
    settings file), else (simulation) ``site-<partition-id>``, else None (the server then
    shows the node id). Stable across runs, unlike node ids."""
    name = str(node_config.get("site-name", "")).strip()
    if name:
        return check_site_name(name, setting_label(node_config, "site-name"))
    if "partition-id" in node_config:
        return f"site-{int(node_config['partition-id'])}"
    return None


#: What a site's settings file may set: the site admin's own settings (budget, ledger, state,
#: name). How the SuperNode runs (domain, data-path, device, ...) stays in node_config and what
#: the federation decides in run_config, so a file in the data folder can change neither.
SITE_FILE_KEYS = ("dp-epsilon", "dp-delta", "dp-rounds", "ledger-path", "state-dir", "site-name")
#: Settings holding a path: a relative one is resolved against the settings file's folder.
SITE_PATH_KEYS = ("ledger-path", "state-dir")


class SiteConfig(Mapping[str, Any]):
    """A site's node_config, completed by its settings file for the keys node_config lacks.

    Maps key -> value like node_config does (so every node_config reader takes it);
    :meth:`label` says where a key's value came from, for error messages.
    """

    def __init__(self, values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
        self._values = dict(values)
        self._sources = dict(sources)  # key -> path of the settings file (absent: node_config)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def from_file(self) -> list[str]:
        """The keys whose values come from the settings file."""
        return sorted(self._sources)

    def label(self, key: str) -> str:
        """``node_config KEY`` or ``FILE: KEY``: where ``key``'s value was set."""
        return f"{self._sources[key]}: {key}" if key in self._sources else f"node_config {key}"


def setting_label(config: Mapping[str, Any], key: str) -> str:
    """Where ``key`` of a site's settings was set (see :meth:`SiteConfig.label`)."""
    return config.label(key) if isinstance(config, SiteConfig) else f"node_config {key}"


#: The largest settings file read: it holds a handful of keys.
MAX_SITE_FILE_BYTES = 64 * 1024


def read_site_file(path: Path) -> dict[str, str | int | float]:
    """The settings in the site's ``fedmoco-site.toml`` at ``path``: only :data:`SITE_FILE_KEYS`,
    scalar values, relative paths resolved against the file's folder. ConfigError (one line
    naming the file and the key) for an unreadable file, invalid TOML, an unknown key or a
    value that is not a number or a string. Values are checked further where they are used,
    by the same rules as node_config's."""
    try:
        size = path.stat().st_size
        if size > MAX_SITE_FILE_BYTES:  # a settings file is a few lines: read no more
            raise ConfigError(f"{path}: the site settings file is {size:,} bytes; a settings file "
                              f"has a few lines (at most {MAX_SITE_FILE_BYTES:,} bytes)")
        # utf-8-sig: a byte-order mark (Windows editors) would otherwise be "invalid statement"
        table = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the site settings file ({' '.join(str(exc).split())})") from None
    out: dict[str, str | int | float] = {}
    for key, value in table.items():
        if key not in SITE_FILE_KEYS:
            raise ConfigError(f"{path}: {key}: not a site setting; this file may set only {', '.join(SITE_FILE_KEYS)} "
                              "(the rest belongs in node_config or the run's config)")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{path}: {key}: expected a number or a string, got {type(value).__name__}")
        if key in (*SITE_PATH_KEYS, "site-name") and not isinstance(value, str):  # ledger-path = 5: a typo
            raise ConfigError(f"{path}: {key}: expected a quoted string, got {type(value).__name__} {value!r}")
        if key in SITE_PATH_KEYS and str(value).strip():
            # As Docker Compose and Cargo do: a path in a file means the same wherever the
            # SuperNode was started from.
            value = str(path.parent / Path(str(value).strip()).expanduser())
        out[key] = value
    return out


def site_config(node_config: Mapping[str, Any], data_path: Path) -> SiteConfig:
    """The site's own settings: node_config, then ``data_path/fedmoco-site.toml`` for each
    :data:`SITE_FILE_KEYS` key node_config leaves unset (absent or blank). The ledger's place
    comes from one source: a node_config that names ``ledger-path`` or ``state-dir`` also
    overrides the file's ``ledger-path`` (else node_config's state-dir would hold training
    state while the file moved the ledger elsewhere). The file is optional; ConfigError naming
    it when it is invalid (:func:`read_site_file`)."""
    path = data_path / SITE_SETTINGS_FILE
    from_file = read_site_file(path) if path.is_file() else {}
    is_set = lambda k: bool(str(node_config.get(k, "")).strip())  # noqa: E731
    if is_set("state-dir"):
        from_file.pop("ledger-path", None)
    unset = [k for k in from_file if not is_set(k)]
    return SiteConfig({**node_config, **{k: from_file[k] for k in unset}}, {k: str(path) for k in unset})


def check_outside_data(path: Path | None, data_path: Path, label: str) -> None:
    """ConfigError when ``path`` (the ledger or the state folder) lies inside the data folder:
    data folders get re-exported and replaced wholesale, which would silently reset the
    privacy budget, are often read-only mounts, and are scanned as data (docs/privacy.md)."""
    if path is None:
        return
    resolved, data = path.expanduser().resolve(), data_path.expanduser().resolve()
    if resolved == data or resolved.is_relative_to(data):
        # Quoted: the reason the server sees scrubs a path under the site's folders to its closing
        # quote; unquoted it ran to the end of the line and took the explanation with it (an audit).
        raise ConfigError(f'{label}: "{path}" is inside the data folder; keep the privacy ledger and the state '
                          "folder outside it (docs: privacy.md)")



def site_float(node: Mapping[str, Any], key: str, default: float | None) -> float | None:
    """A positive number from the site's own settings (node_config or its settings file);
    ConfigError naming where it was set."""
    if key not in node:
        return default
    where = setting_label(node, key)
    try:
        if isinstance(node[key], bool):  # float(True) == 1.0: a flag is not a budget
            raise TypeError
        value = float(node[key])
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number, got {node[key]!r}") from None
    if not value > 0:
        raise ConfigError(f"{where}: must be > 0, got {node[key]!r}")
    if math.isinf(value) and str(node[key]).strip().lower() not in ("inf", "+inf", "infinity"):
        # 1e400 overflows to inf: only a literal inf asks for a release without noise
        raise ConfigError(f"{where}: {node[key]!r} is too large; write inf to mean no noise (benchmarks only)")
    return value


#: Most releases a site may plan (node_config dp-rounds): a plan is priced and stored per release.
MAX_PLANNED_RELEASES = 100_000


def site_count(node: Mapping[str, Any], key: str) -> int:
    """A whole number >= 0 from the site's own settings (0 when unset); ConfigError naming where."""
    value = site_float(node, key, 0.0) or 0.0
    if math.isinf(value) or value != int(value):
        raise ConfigError(f"{setting_label(node, key)}: expected a whole number, got {node[key]!r}")
    if value > MAX_PLANNED_RELEASES:
        raise ConfigError(f"{setting_label(node, key)}: {node[key]!r} is more than {MAX_PLANNED_RELEASES:,}")
    return int(value)


def ledger_path(node_config: Mapping[str, Any]) -> Path | None:
    """node_config ``ledger-path``, else ``<state-dir>/privacy-ledger.json``, else None."""
    explicit = str(node_config.get("ledger-path", "")).strip()
    if explicit:
        return _path(explicit, node_config, "ledger-path")
    state_dir = str(node_config.get("state-dir", "")).strip()
    return _path(state_dir, node_config, "state-dir") / LEDGER_FILE if state_dir else None


def _path(value: str, node: Mapping[str, Any], key: str) -> Path:
    """``value`` as a path; ConfigError naming where it was set if no file system takes it."""
    if "\0" in value:
        raise ConfigError(f"{setting_label(node, key)}: a path cannot hold a NUL character")
    return Path(value).expanduser()


def privacy_settings(own: Mapping[str, Any], data_path: Path) -> dict[str, Any]:
    """The site's budget and where it keeps its ledger and state, checked:
    ``epsilon`` (None: the site shares nothing), ``delta``, ``delta_label`` (where delta was
    set, for the check against the number of images), ``dp_rounds`` (0: the run's rounds),
    ``ledger_path`` and ``state_dir`` (None when unset). ConfigError (one line naming the
    setting) for a bad value or a ledger or state folder inside the data folder."""
    state_dir = str(own.get("state-dir", "")).strip()
    out = {
        "epsilon": site_float(own, "dp-epsilon", None),
        "delta": site_float(own, "dp-delta", DEFAULT_DELTA),
        "delta_label": setting_label(own, "dp-delta"),
        "dp_rounds": site_count(own, "dp-rounds"),
        "ledger_path": ledger_path(own),
        "state_dir": _path(state_dir, own, "state-dir") if state_dir else None,
    }
    # A ledger in the data folder would be reset whenever the data is re-exported (docs/privacy.md).
    check_outside_data(out["ledger_path"], data_path,
                       setting_label(own, "ledger-path" if str(own.get("ledger-path", "")).strip() else "state-dir"))
    check_outside_data(out["state_dir"], data_path, setting_label(own, "state-dir"))
    return out
