"""The feed benchmarks' shared pieces: the profile table and the JSON headline keys."""

import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import math  # noqa: E402

from feed_common import feed_record, loader_rate, profile_lines, steady_windows, trainer_rate  # noqa: E402


class _Bases(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((4, 64, 64), float(i))


class _Views(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # Large enough that the matrix products dominate the pass by far even when other
        # processes share the cores (an 8 x 8 product lost to the additions under load).
        self.w = torch.randn(4 * 64 * 64, 256)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = x.flatten(1)
        for _ in range(20):
            y @ self.w  # the dominant op
        return x + 1, x - 1


def test_profile_section_splits_the_pass_and_names_the_dominant_operator():
    lines = profile_lines(_Bases(), _Views(), 8, 4, "a test pass", rows=3)
    assert lines[1] == "## Where the time goes: a test pass"
    assert "read + collate" in lines[3] and "views" in lines[3] and "ms a pair" in lines[3]
    rows = [line for line in lines if line.startswith("| `") or line.startswith("| other")]
    assert rows[0].startswith("| `aten::mm`") and len(rows) == 4  # 3 operators and the others
    shares = [float(r.rstrip(" |").rsplit("|", 1)[1].strip().rstrip("%")) for r in rows]
    assert 98 <= sum(shares) <= 102  # rounding of four percentages


def test_headline_keeps_the_contract_keys():
    rates = {"base": (10.0, 9.0, 11.0), "cached": (20.0, 19.0, 21.0), "batched": (100.0, 90.0, 110.0)}
    record = feed_record("feed_x", rates, {}, image_size=64)
    assert record == {"bench": "feed_x", "image_size": 64, "pairs_per_s_per_core": 100.0,
                      "cached_per_sample_pairs_per_s_per_core": 20.0, "baseline_pairs_per_s_per_core": 10.0,
                      "speedup": 10.0}


def test_steady_windows_skip_the_workers_first_wave_and_time_twice_as_long():
    # 12 workers x 2 prefetched batches: the clock starts after 25 batches and runs for 48
    assert steady_windows(10, 12) == (25, 48)
    assert steady_windows(100, 12) == (25, 100)
    assert steady_windows(3, 0) == (3, 4)  # no workers: the main process loads, one batch ahead counted


class _CountingBases(_Bases):
    def __init__(self) -> None:
        self.reads = 0

    def __getitem__(self, i: int) -> torch.Tensor:
        self.reads += 1
        return super().__getitem__(i)


def test_loader_rate_reads_the_warm_up_and_the_timed_batches_and_no_more():
    bases = _CountingBases()
    rate = loader_rate(bases, None, torch.device("cpu"), 4, 5, 0, pin=False)
    warm, timed = steady_windows(5, 0)
    assert bases.reads == 4 * (warm + timed) and rate > 0


class _OfferingViews(torch.utils.data.Dataset):
    """A dataset that offers batched views, as the cached medical and satellite datasets do."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int):
        return torch.rand(3, 64, 64), torch.rand(3, 64, 64)

    def batched_views(self):
        return _Bases3(), _Halves()


class _Bases3(_Bases):
    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.rand(3, 64, 64)


class _Halves(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x.flip(-1)


def test_trainer_rate_runs_fedmocos_own_loop_on_repeated_batched_views():
    # 6 samples repeated to the 16 x 7 the windows need; the rate comes from the Trainer's records
    rate = trainer_rate(_OfferingViews(), 3, torch.device("cpu"), 16, 3, 0)
    assert math.isfinite(rate) and rate > 0
