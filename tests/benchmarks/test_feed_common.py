"""The feed benchmarks' shared pieces: the profile table and the JSON headline keys."""

import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

from feed_common import feed_record, profile_lines  # noqa: E402


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
