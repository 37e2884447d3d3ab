"""The federation's global queue: a FIFO of privatised summaries that remembers site and round.

Each round every site sends DP summaries of its embeddings, privatised on the site (noisy
per-centre prototypes by default, or per-image noisy keys; see ``fedmoco.privacy`` and
docs/privacy.md). The server appends them here, tagged with the sending node and the
round, drops those older than ``max_age`` rounds (:meth:`GlobalKeyQueue.expire`: they were
computed by an encoder the federation has since moved away from), and hands every site a
random sample as extra negatives, by default leaving out that site's own (a site already
contrasts against its own data through its local queue, and its own summaries would be
near-duplicates of its positives).

The server also merges the prototypes it holds into C **public centres**
(:meth:`GlobalKeyQueue.centres`, ``fedmoco.privacy.merge_centres``) and sends them to every
site, which assigns its next release's embeddings to them. They are computed from released
(DP) vectors and their round tags only, i.e. post-processing, and they drift towards the
data's clusters round by round (docs/privacy.md).

Everything in :meth:`GlobalKeyQueue.state_dict` is a tensor or a plain Python value, so the
round checkpoint loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from typing import Any

import torch

from fedmoco.errors import ConfigError
from fedmoco.privacy import merge_centres


class GlobalKeyQueue:
    """A ring buffer of ``size`` keys of dimension ``dim``, each tagged with its site.

    Memory is fixed at construction: ``keys`` (size, dim) float32, ``owner`` and
    ``round`` (size,) int64. A site is its name (str) when it has one, else its Flower node id
    (unsigned 64-bit, which does not fit an int64 tensor), so ``owner`` holds an index into
    ``sites``, a list of names and node ids. Names outlive node ids: a resumed federation's
    sites come back under new node ids, and still do not get their own summaries back.
    """

    def __init__(self, size: int, dim: int) -> None:
        if int(size) < 1:
            raise ConfigError(f"global-queue-size must be >= 1, got {size}")
        if int(dim) < 1:
            raise ConfigError(f"dim must be >= 1, got {dim}")
        self.size = int(size)
        self.dim = int(dim)
        self.keys = torch.zeros(self.size, self.dim)
        self.owner = torch.full((self.size,), -1, dtype=torch.long)  # index into self.sites
        self.round = torch.zeros(self.size, dtype=torch.long)  # server round the key arrived in
        self.ptr = 0
        self.count = 0
        self.sites: list[int | str] = []

    def __len__(self) -> int:
        """Entries held now (expired slots excluded)."""
        return int((self.owner[: self.count] >= 0).sum())

    @torch.no_grad()
    def expire(self, current_round: int, max_age: int) -> int:
        """Drop entries that arrived more than ``max_age`` rounds before ``current_round``
        (so an entry from round r serves rounds r+1 .. r+max_age); ``max_age`` 0 keeps all.
        Returns how many were dropped. Dropped slots are refilled by later enqueues."""
        if int(max_age) < 0:
            raise ConfigError(f"global-queue-max-age must be >= 0, got {max_age}")
        if max_age == 0:
            return 0
        live = self.owner[: self.count] >= 0
        stale = live & (self.round[: self.count] < int(current_round) - int(max_age))
        self.owner[: self.count][stale] = -1
        return int(stale.sum())

    def _site_index(self, site: int | str) -> int:
        site = _site(site)
        try:
            return self.sites.index(site)
        except ValueError:
            self._forget_absent_sites()
            self.sites.append(site)
            return len(self.sites) - 1

    def _forget_absent_sites(self) -> None:
        """Drop node ids that own no key any more, so ``sites`` cannot grow without bound
        when nodes come and go (a restarted SuperNode gets a new id)."""
        live = torch.unique(self.owner[self.owner >= 0]).tolist()
        if len(live) == len(self.sites):
            return
        remap = torch.full((len(self.sites) + 1,), -1, dtype=torch.long)
        for new, old in enumerate(live):
            remap[old] = new
        self.owner = torch.where(self.owner >= 0, remap[self.owner.clamp_min(0)], self.owner)
        self.sites = [self.sites[i] for i in live]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, node_id: int | str, server_round: int) -> None:
        """Append ``keys`` (n, dim) from site ``node_id`` (a node id, or the site's name),
        overwriting the oldest once full."""
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"global queue: expected keys of shape (n, {self.dim}), got {tuple(keys.shape)}")
        n = keys.shape[0]
        if n == 0:
            return
        if n > self.size:  # only the newest `size` keys would survive anyway
            keys, n = keys[-self.size:], self.size
        site = self._site_index(node_id)
        idx = (torch.arange(n) + self.ptr) % self.size
        self.keys[idx] = keys.detach().to(dtype=self.keys.dtype, device="cpu")
        self.owner[idx] = site
        self.round[idx] = int(server_round)
        self.ptr = (self.ptr + n) % self.size
        self.count = min(self.size, self.count + n)

    def held_through(self, server_round: int) -> int:
        """Live entries that arrived in ``server_round`` or before."""
        live = self.owner[: self.count] >= 0
        return int((live & (self.round[: self.count] <= int(server_round))).sum())

    def sample(self, n: int, *, exclude: int | str | None = None, exclude_through_round: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Up to ``n`` keys (m, dim), m <= n, drawn uniformly without replacement.

        ``exclude``: a site (name or node id) whose keys are left out (the receiving site's own).
        ``exclude_through_round``: also leave out every key that arrived in that round or before
        (a resumed run's entries whose owners cannot be told apart from the receiver).
        """
        eligible = self.owner[: self.count] >= 0
        if exclude is not None and _site(exclude) in self.sites:
            eligible &= self.owner[: self.count] != self.sites.index(_site(exclude))
        if exclude_through_round is not None:
            eligible &= self.round[: self.count] > int(exclude_through_round)
        idx = eligible.nonzero().squeeze(1)
        if idx.numel() > n:
            idx = idx[torch.randperm(idx.numel(), generator=generator)[:n]]
        return self.keys[idx].clone()

    @torch.no_grad()
    def centres(self, count: int, *, half_life: float = 1.0) -> torch.Tensor:
        """Public centres for the sites' next prototype release: (k, dim) unit rows, k <= count.

        The live entries (every site's, the receiver's own included: they are its earlier DP
        releases, public like the rest) merged by ``merge_centres`` (weighted spherical
        k-means), each weighted 0.5 ** (age / ``half_life``) where age is how many rounds
        before the newest entry it arrived (0: the newest round only): newer prototypes come
        from an encoder closer to the one the sites release with now; and divided by the number
        of rows its site released that round, so every site's release weighs the same. Depends
        only on the released vectors, their round tags and which site sent them; deterministic
        (the k-means++ starts are seeded by the newest round number). (0, dim) when the queue
        is empty.
        """
        if not float(half_life) >= 0:
            raise ConfigError(f"centre half-life must be >= 0, got {half_life}")
        live = self.owner[: self.count] >= 0
        if not bool(live.any()):
            return torch.zeros(0, self.dim)
        rounds = self.round[: self.count][live].double()
        age = rounds.max() - rounds
        weights = (age == 0).double() if half_life == 0 else 0.5 ** (age / float(half_life))
        # Each site's release of a round weighs as one, however many rows it kept: a site
        # cannot pull the public centres its way by sending more rows than the others.
        group = self.owner[: self.count][live].long() * (int(rounds.max()) + 1) + rounds.long()
        _, inverse, rows = torch.unique(group, return_inverse=True, return_counts=True)
        weights = weights / rows[inverse].double()
        # k-means++ starts seeded by the newest round: public, and different starts in later rounds
        return merge_centres(self.keys[: self.count][live], count, weights.float(), seed=int(rounds.max()))

    def counts_by_site(self) -> dict[int | str, int]:
        """Keys currently held per site (name, or node id)."""
        owners = self.owner[: self.count]
        return {node: int((owners == i).sum()) for i, node in enumerate(self.sites) if (owners == i).any()}

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, "dim": self.dim, "keys": self.keys.clone(), "owner": self.owner.clone(),
                "round": self.round.clone(), "ptr": self.ptr, "count": self.count, "sites": list(self.sites)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["size"]) != self.size or int(state["dim"]) != self.dim:
            raise ConfigError(
                f"global queue: checkpoint holds a ({state['size']}, {state['dim']}) queue but this run asks for "
                f"({self.size}, {self.dim}); keep global-queue-size and dim when resuming"
            )
        self.keys = state["keys"].clone().float()
        self.owner = state["owner"].clone().long()
        self.round = state["round"].clone().long()
        self.ptr = int(state["ptr"])
        self.count = int(state["count"])
        self.sites = [_site(s) for s in state["sites"]]


def _site(site: int | str) -> int | str:
    """A queue owner: a site name as is, a node id as a Python int (numpy or tensor ids too)."""
    return site if isinstance(site, str) else int(site)
