"""The federation's round plots; the code lives in :mod:`fedmoco.federation_plots`."""

from fedmoco.federation_plots import plot_federation, round_records

__all__ = ["plot_federation", "round_records"]
