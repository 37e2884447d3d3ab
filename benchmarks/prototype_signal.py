"""Does a DP prototype carry signal? Cosine of released prototypes with their noise-free bucket means.

A site's release is the real mechanism (``fedmoco.privacy``): Poisson sample at rate q,
assign each unit embedding to one of C public centres, sum per centre, add N(0, z^2) per
coordinate with z scheduled so that ``--rounds`` releases cost (epsilon, delta)
(``prototype_noise_schedule``: the first release gets ``--first-share`` times the privacy of
each later one, as the ledger plans it), normalise. For every centre that got at least one
embedding, the released row is compared with the normalised noise-free sum of its bucket
(the same sample through ``noisy_prototype_sums`` with z and with z = 0). Reported: the mean
cosine over buckets of >= ``--min-bucket`` images (the issue's target: >= 0.8 at epsilon =
1.5, delta = 1e-5, 10 rounds, 4,000 images), over all buckets, the share of rows the
noisy-norm threshold keeps, and next to it the per-record keys' cosine (released key vs
true key, ``privatize_keys`` at the keys mode's z for the same budget).

Centres (``centres`` column):

* ``seeded``: public seeded directions, what every site uses in round 1;
* ``server``: the federation's loop, as the code runs it: ``--sites`` sites of the same
  distribution release every round (``choose_centres`` on what the server sent, as
  ``clients/app.py`` does; the threshold-kept rows), the server enqueues the releases in a
  ``GlobalKeyQueue`` (tagged by site and round, ``--max-age`` expiry) and merges them into C
  centres (``GlobalKeyQueue.centres`` -> ``merge_centres``) for the next round. The row is the
  measured site's release number ``--release`` (after ``--release`` - 1 rounds of merging);
  a trajectory over all planned releases is printed for the default C.

Embeddings (D = ``--dim``):

* ``synthetic`` (default): K clusters shared by all sites, x = normalize(mu_k + sigma g);
  sigma is set so a cluster's mean resultant length is ``--rho`` (0.5: as spread out as
  contrastive embeddings within a class);
* ``glyphs`` (default unless ``--quick``): real embeddings: a tiny MoCo encoder trained with ``fedmoco.pretrain`` on a
  generated glyphs pool (``labelled_task.py``, ``--glyph-pool`` images, ``--glyph-epochs``),
  then ``--sites`` sites of fresh glyph images embedded by its query encoder (first view,
  as a site does with the global weights). Cached under ``--work``;
* ``--checkpoint CKPT --data DIR [--data DIR2 ...]``: a checkpoint's query encoder on the
  given site folders (the first is the measured site).

    python benchmarks/prototype_signal.py                  # synthetic grid + glyphs embeddings
    python benchmarks/prototype_signal.py --no-glyphs      # synthetic grid only (seconds)
    python benchmarks/prototype_signal.py --quick          # C = 8, 4,000 images, synthetic only

Writes benchmarks/results/prototype_signal.md (or --out) and one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from clients.task import RUN_DEFAULTS  # noqa: E402
from common import command_line, device_name, emit_json, machine_lines, markdown_table, write_report  # noqa: E402
from fedmoco.privacy import (calibrate_noise, choose_centres, prototype_noise_schedule,  # noqa: E402
                             noisy_prototype_sums, poisson_sample, privatize_keys, select_prototypes)
from server.queue import GlobalKeyQueue  # noqa: E402

DELTA = 1e-5
DEFAULT_C = RUN_DEFAULTS["prototype-centres"]


SITE_SEED_STRIDE = 1000  # site i > 0 draws its images from seed + 1000 i (same clusters)


def synthetic(n: int, dim: int, clusters: int, rho: float, seed: int, site: int = 0) -> torch.Tensor:
    """n unit embeddings from ``clusters`` Gaussian clusters on the sphere, cluster resultant ~ rho.

    The cluster means come from ``seed``; ``site`` > 0 draws other images of the SAME clusters
    (another site of the same distribution). Site 0 is what earlier versions returned."""
    g = torch.Generator().manual_seed(seed)
    mu = F.normalize(torch.randn(clusters, dim, generator=g), dim=1)
    if site:
        g = torch.Generator().manual_seed(seed + SITE_SEED_STRIDE * site)
    sigma = ((1 / rho**2 - 1) / dim) ** 0.5  # cos(x, mu) ~ 1 / sqrt(1 + sigma^2 D)
    which = torch.randint(0, clusters, (n,), generator=g)
    return F.normalize(mu[which] + sigma * torch.randn(n, dim, generator=g), dim=1)


def embed_folders(model, folders: list[Path], domain: str, image_size: int, options: dict, limit: int
                  ) -> list[torch.Tensor]:
    """First views of each folder's images through the query encoder, L2-normalised (n_i, D)."""
    from fedmoco.data import DataConfig, build_pretrain_data
    from fedmoco.privacy import sample_embeddings

    model.eval()
    out = []
    for folder in folders:
        built = build_pretrain_data(domain, folder, DataConfig(image_size=image_size, seed=0, options=dict(options)))
        out.append(sample_embeddings(model.encoder_q, built.dataset, 1.0, max_items=limit, unreadable="drop",
                                     generator=torch.Generator().manual_seed(0)))
    return out


def checkpoint_embeddings(checkpoint: Path, data: list[Path], domain: str, limit: int) -> list[torch.Tensor]:
    """Each site folder's images through the checkpoint's query encoder."""
    from fedmoco.checkpoint import load_checkpoint
    from fedmoco.pretrain import model_from_checkpoint

    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, checkpoint)
    return embed_folders(model, data, domain, ckpt["data"]["image_size"], ckpt["data"].get("options", {}), limit)


def glyph_embeddings(work: Path, n: int, sites: int, pool: int, epochs: int) -> tuple[list[torch.Tensor], dict]:
    """Real embeddings: train a tiny MoCo encoder on a generated glyphs pool (fedmoco.pretrain,
    quality.py's recipe), then embed ``sites`` folders of ``n`` fresh glyph images each.
    Everything is cached under ``work``; returns (per-site embeddings, what was trained)."""
    from fedmoco.checkpoint import load_checkpoint
    from fedmoco.config import TrainConfig
    from fedmoco.data import DataConfig
    from fedmoco.metrics import read_jsonl
    from fedmoco.pretrain import model_from_checkpoint, pretrain
    from labelled_task import CLASSES, VERSION, write_folder
    from quality import RECIPE, Setup, moco_overrides

    root = Path(work) / f"glyphs-v{VERSION}"
    per_class = -(-n // len(CLASSES))
    folders = [root / f"pool-{pool}"] + [root / f"site-{i}-{per_class}" for i in range(sites)]
    for i, folder in enumerate(folders):
        if not (folder / "labels.csv").exists():
            write_folder(folder, -(-pool // len(CLASSES)) if i == 0 else per_class, seed=0 if i == 0 else 100 + i)
    setup = Setup()
    encoder_dir = root / f"encoder-pool{pool}-e{epochs}"
    ckpt = encoder_dir / "checkpoint.pt"
    if not ckpt.exists():
        result = pretrain("images", folders[0], encoder_dir, moco_overrides=moco_overrides(setup),
                          train_cfg=TrainConfig(epochs=epochs, batch_size=setup.batch_size, lr=setup.lr,
                                                weight_decay=setup.weight_decay, warmup_epochs=0.0, num_workers=0,
                                                seed=0),
                          data_cfg=DataConfig(image_size=setup.image_size, seed=0, options=dict(RECIPE)),
                          device=torch.device("cpu"), progress=False)
        ckpt = result.checkpoint
    epochs_run = [r for r in read_jsonl(encoder_dir / "metrics.jsonl") if r.get("event") == "epoch"]
    trained = sum(r["seconds"] for r in epochs_run)
    cached = encoder_dir / f"embeddings-{sites}x{n}.pt"
    if cached.exists():
        emb = torch.load(cached, weights_only=True)
    else:
        model = model_from_checkpoint(load_checkpoint(ckpt))
        emb = embed_folders(model, folders[1:], "images", setup.image_size, RECIPE, n)
        torch.save(emb, cached)
    info = {"pool": pool, "epochs": epochs, "train_seconds": trained, "work": str(encoder_dir),
            "final_loss": epochs_run[-1]["loss"], "emb_std": epochs_run[-1]["emb_std"],
            "encoder": f"tiny CNN ({setup.norm} norm), MLP head {setup.hidden_dim} -> {setup.dim}, "
                       f"batch {setup.batch_size}, K = {setup.queue_size}, views {RECIPE}"}
    return emb, info


def measure(emb: torch.Tensor, centres: torch.Tensor, z: float, q: float, min_bucket: int,
            min_cosine: float, seed: int, repeats: int = 5) -> dict[str, float]:
    """One release: cosine of each released row with its bucket's noise-free mean, averaged
    over ``repeats`` noise draws on the same sample (one draw varies by about +-0.03)."""
    g = torch.Generator().manual_seed(seed)
    sample = emb[poisson_sample(len(emb), q, g)]
    exact, counts = noisy_prototype_sums(sample, centres, 0.0)
    nonempty = counts > 0
    draws = [noisy_prototype_sums(sample, centres, z, g)[0] for _ in range(repeats)]
    noisy = draws[0]
    cos = torch.stack([F.cosine_similarity(d[nonempty], exact[nonempty], dim=1) for d in draws]).mean(0)
    big = counts[nonempty] >= min_bucket * q  # buckets of >= min_bucket site images (sampled at q)
    rho = exact[nonempty].norm(dim=1) / counts[nonempty]
    kept = select_prototypes(noisy, z, min_cosine=min_cosine).shape[0]
    return {"z": z, "cos_big": float(cos[big].mean()) if big.any() else float("nan"), "n_big": int(big.sum()),
            "cos_all": float(cos.mean()), "n_buckets": int(nonempty.sum()), "kept": kept,
            "rho_big": float(rho[big].mean()) if big.any() else float("nan")}


def federation(sites: list[torch.Tensor], c: int, zs: list[float], q: float, min_cosine: float,
               max_age: int, min_bucket: int, seed: int = 0) -> tuple[list[torch.Tensor], list[dict]]:
    """The server loop: every round each site releases on the centres it chose from what the
    server sent (``choose_centres``, as clients/app.py), the server enqueues the kept rows and
    merges its queue into C centres (``GlobalKeyQueue.centres``). ``zs``: the noise multiplier
    of each release (the ledger's schedule, first release first). Returns the centres site 0
    used in each round and site 0's measured release in each round."""
    releases = len(zs)
    dim = sites[0].shape[1]
    queue = GlobalKeyQueue(RUN_DEFAULTS["global-queue-size"], dim)
    g = torch.Generator().manual_seed(1_000 + seed)
    used, measured = [], []
    for r in range(1, releases + 1):
        queue.expire(r, max_age)
        sent = queue.centres(c)
        centres = choose_centres(sent if len(sent) else None, c, dim, seed=7 + r - 1)  # round 1: seed 7 = seeded
        used.append(centres)
        z = zs[r - 1]
        measured.append(measure(sites[0], centres, z, q, min_bucket, min_cosine, seed=3 + r))
        for node, emb in enumerate(sites):
            noisy, _ = noisy_prototype_sums(emb[poisson_sample(len(emb), q, g)], centres, z, g)
            queue.enqueue(select_prototypes(noisy, z, min_cosine=min_cosine), node, r)
    return used, measured


def keys_cosine(emb: torch.Tensor, eps: float, rounds: int, q: float, seed: int) -> tuple[float, float]:
    """(z, mean cosine of a released per-record key with its true key) for the same budget."""
    z = calibrate_noise(eps, DELTA, rounds, q)
    g = torch.Generator().manual_seed(seed)
    true = emb[poisson_sample(len(emb), q, g)][:2000]
    return z, float(F.cosine_similarity(privatize_keys(true, z, g), true, dim=1).mean())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small grid")
    p.add_argument("--device", default="cpu", type=device_name, help="accepted for the suite; everything runs on the CPU")
    p.add_argument("--rounds", type=int, default=10, help="releases the budget is planned for")
    p.add_argument("--release", type=int, default=5, help="server centres: which release of the measured site "
                   "(after release-1 rounds of merging)")
    p.add_argument("--sites", type=int, default=4, help="sites of the same distribution in the server loop")
    p.add_argument("--max-age", type=int, default=RUN_DEFAULTS["global-queue-max-age"])
    p.add_argument("--sample-rate", type=float, default=1.0, help="prototype Poisson rate q")
    p.add_argument("--first-share", type=float, default=RUN_DEFAULTS["prototype-first-share"],
                   help="the first release's share of the budget relative to each later one (run_config "
                        "prototype-first-share; 1 = every release alike)")
    p.add_argument("--key-sample-rate", type=float, default=0.05, help="per-record keys' q (their default)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--rho", type=float, action="append", help="synthetic: a cluster's mean resultant length "
                   "(repeatable; default 0.5 0.7 0.9)")
    p.add_argument("--clusters", type=int, default=16)
    p.add_argument("--min-bucket", type=int, default=200)
    p.add_argument("--min-cosine", type=float, default=0.5, help="the release's noisy-norm threshold")
    p.add_argument("--glyphs", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure real embeddings of a MoCo encoder trained on generated glyphs "
                   "(default: on, off with --quick or --checkpoint)")
    p.add_argument("--glyph-pool", type=int, default=800, help="glyph images the encoder is trained on")
    p.add_argument("--glyph-epochs", type=int, default=12)
    p.add_argument("--work", type=Path, default=Path("/tmp/fedmoco-prototype-signal"), help="glyphs cache")
    p.add_argument("--checkpoint", type=Path, help="real embeddings of this checkpoint's query encoder ...")
    p.add_argument("--data", type=Path, action="append", help="... on these site folders (repeatable)")
    p.add_argument("--domain", default="images")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prototype_signal.md")
    args = p.parse_args(argv)
    if args.glyphs is None:
        args.glyphs = not (args.quick or args.checkpoint)
    if args.checkpoint and not args.data:
        p.error("--checkpoint needs --data")
    if not 1 <= args.release <= args.rounds:
        p.error(f"--release must be in 1..--rounds ({args.rounds})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    epsilons = [1.5, 8.0] if args.quick else [1.5, 4.0, 8.0]
    sizes = [4000] if args.quick else [1000, 4000, 16000]
    cs = [DEFAULT_C] if args.quick else [8, 16, 32]  # C = 128: no bucket reaches 200 images below 16,000
    t0 = time.perf_counter()

    # Embedding sources: name -> a function of the site size giving the sites' embeddings.
    sources: dict[str, object] = {}
    glyph_info = None
    if args.checkpoint:
        real = checkpoint_embeddings(args.checkpoint, args.data, args.domain, max(sizes))
        sources["real"] = lambda n: [e[:n] for e in real]
    else:
        for rho in args.rho or ([0.5, 0.9] if args.quick else [0.5, 0.7, 0.9]):
            sources[f"rho{rho}"] = (lambda n, rho=rho: [synthetic(n, args.dim, args.clusters, rho, seed=1, site=i)
                                                        for i in range(args.sites)])
        if args.glyphs:
            glyphs, glyph_info = glyph_embeddings(args.work, 4000, args.sites, args.glyph_pool, args.glyph_epochs)
            sources["glyphs"] = lambda n: [e[:n] for e in glyphs]

    # How spread out a site's embeddings are: length of their mean (0 = all over the sphere, 1 = one point).
    spread = {name: float(make(4000)[0].mean(dim=0).norm()) for name, make in sources.items()}
    rows, results, trajectories = [], [], {}
    for (name, make), n, c, eps in itertools.product(sources.items(), sizes, cs, epsilons):
        sites = make(n)
        if len(sites[0]) < n:
            continue  # a real folder smaller than this size
        z_first, z_rest = prototype_noise_schedule(eps, DELTA, args.rounds, args.sample_rate, args.first_share)
        kz, kcos = keys_cosine(sites[0], eps, args.rounds, args.key_sample_rate, seed=5)
        _, measured = federation(sites, c, [z_first] + [z_rest] * (args.rounds - 1), args.sample_rate,
                                 args.min_cosine, args.max_age, args.min_bucket)
        if c == DEFAULT_C and n == 4000:
            trajectories[(name, eps)] = [m["cos_big"] for m in measured]
        for source, m in (("seeded", measured[0]), ("server", measured[args.release - 1])):
            results.append({"embeddings": name, "n": n, "C": c, "centres": source, "eps": eps, **m,
                            "keys_z": kz, "keys_cos": kcos})
            rows.append([name, n, c, source, eps, f"{m['z']:.2f}", f"{m['n_big']}/{m['n_buckets']}",
                         f"{m['rho_big']:.2f}", f"**{m['cos_big']:.3f}**", f"{m['cos_all']:.3f}",
                         f"{m['kept']}/{c}", f"{kz:.2f}", f"{kcos:.3f}"])
    seconds = time.perf_counter() - t0

    def headline(source: str) -> dict[str, float]:
        return {r["embeddings"]: r["cos_big"] for r in results
                if r["n"] == 4000 and r["eps"] == 1.5 and r["C"] == DEFAULT_C and r["centres"] == source}

    write_report(args.out, report_lines(args, argv, rows, trajectories, glyph_info, spread, seconds)
                 + missed_lines(results, args))
    emit_json({"bench": "prototype_signal", "seconds": seconds,
               # the figure: a release on the centres the server hands back (release --release)
               f"cos_big_eps1.5_n4000_C{DEFAULT_C}": headline("server"),
               f"round1_cos_big_eps1.5_n4000_C{DEFAULT_C}": headline("seeded"),
               "release": args.release,
               "keys_cos_eps1.5_n4000": {r["embeddings"]: r["keys_cos"] for r in results
                                         if r["eps"] == 1.5 and r["n"] == 4000 and r["C"] == DEFAULT_C
                                         and r["centres"] == "seeded"},
               "trajectory_C8_n4000": {f"{k[0]}_eps{k[1]}": v for k, v in trajectories.items()},
               "site_resultant": spread, "glyphs": glyph_info, "results": results})
    return 0


def report_lines(args: argparse.Namespace, argv: list[str] | None, rows: list[list[object]],
                 trajectories: dict, glyph_info: dict | None, spread: dict[str, float], seconds: float) -> list[str]:
    src = ([f"real embeddings of {', '.join(map(str, args.data))} by {args.checkpoint}"] if args.checkpoint else
           [f"`rho<r>`: synthetic, {args.clusters} clusters in D = {args.dim} shared by the {args.sites} sites, "
            "cluster resultant length r"])
    if glyph_info:
        src.append(f"`glyphs`: real embeddings (D = 128): {glyph_info['encoder']}, trained by `fedmoco.pretrain` "
                   f"for {glyph_info['epochs']} epochs on {glyph_info['pool']} generated glyph images "
                   f"(benchmarks/labelled_task.py, 8 classes; {glyph_info['train_seconds']:.0f} s of training on "
                   f"one core, last epoch's InfoNCE loss {glyph_info['final_loss']:.2f}), then {args.sites} sites of 4,000 fresh glyph images each embedded by its query "
                   "encoder (first view; its augmentation is not seeded, so a fresh embedding pass moves the "
                   "glyphs rows by about +-0.01-0.03; the embeddings are cached beside the encoder)")
    width = max((len(v) for v in trajectories.values()), default=0)
    traj = [[name, eps, *(f"{v:.3f}" for v in vals)] for (name, eps), vals in trajectories.items()]
    return [
        "# DP prototypes: cosine of the released prototype with its bucket's noise-free mean",
        "",
        f"Command: `{command_line('prototype_signal.py', argv)}` ({seconds:.0f} s)",
        "",
        "Embeddings: " + "; ".join(src) + ".",
        "",
        "Length of the mean of a site's 4,000 embeddings (0: spread over the sphere, 1: collapsed to one "
        "point): " + ", ".join(f"{k} {v:.2f}" for k, v in spread.items()) + ".",
        "",
        f"delta = {DELTA:g}, {args.rounds} releases planned (z from `prototype_noise_schedule`: the first release "
        f"gets {args.first_share:g} times the privacy of each later one, so its z is smaller and the others' larger "
        f"than the uniform `calibrate_prototype_noise`), prototype q = "
        f"{args.sample_rate}, per-record keys q = {args.key_sample_rate} (their default), calibrated for the same "
        f"(epsilon, delta, rounds). {args.sites} sites of the same distribution and size; the measured site is "
        "site 0.",
        "",
        f"`centres`: `seeded` = public seeded directions (every site's round 1); `server` = release {args.release} "
        f"of the federation's loop: each round every site releases on the centres the server sent (topped up with "
        f"seeded directions, `choose_centres`), the server enqueues the kept rows in its `GlobalKeyQueue` "
        f"(max age {args.max_age}) and merges them into C centres (`GlobalKeyQueue.centres`: weighted spherical "
        f"k-means of released vectors only, i.e. post-processing) for the next round.",
        "",
        f"Columns: `z` prototype noise multiplier (std per coordinate of a sum); `big/all` buckets with >= "
        f"{args.min_bucket} site images / non-empty buckets; `bucket rho` their mean resultant length; `cos big` "
        f"mean cosine of released vs noise-free bucket mean over the big buckets (target >= 0.8 at eps 1.5, "
        f"4,000 images); `cos all` over all non-empty buckets; `kept` rows the noisy-norm threshold (estimated "
        f"cosine >= {args.min_cosine}) releases out of C; `keys z`, `keys cos`: per-record keys (noise std 2z per "
        "coordinate) and the mean cosine of a released key with its true key.",
        "",
        *markdown_table(["embeddings", "images", "C", "centres", "eps", "z", "big/all", "bucket rho", "cos big",
                         "cos all", "kept", "keys z", "keys cos"], rows),
        "",
        f"## Release by release (C = {DEFAULT_C}, 4,000 images per site): `cos big` of the measured site",
        "",
        *markdown_table(["embeddings", "eps", *(f"r{i + 1}" for i in range(width))], traj),
        "",
        "Machine:",
        *machine_lines(),
    ]


def missed_lines(results: list[dict], args: argparse.Namespace) -> list[str]:
    """The settings of the issue's target (eps 1.5, 4,000 images) where it is missed, and why."""
    target = [r for r in results if r["eps"] == 1.5 and r["n"] == 4000]
    missed = [r for r in target if not r["cos_big"] >= 0.8]  # nan (no big bucket) counts as missed
    lines = ["", "## Where the target (cos big >= 0.8 at eps 1.5, 4,000 images) is missed", ""]
    if not missed:
        return lines + ["Nowhere in this grid."]
    lines += [f"- {r['embeddings']}, C = {r['C']}, {r['centres']} centres: "
              + (f"{r['cos_big']:.3f} (bucket rho {r['rho_big']:.2f}, {r['n_big']} big buckets)"
                 if r["n_big"] else "no bucket of >= 200 images") for r in missed]
    return lines + ["", "Why: a released sum of n unit vectors with resultant length rho has cosine about "
                    "n rho / sqrt(n^2 rho^2 + z^2 D) with its noise-free direction, so a cosine of 0.8 needs "
                    "n rho >= (4/3) z sqrt(D): 133 at the uniform z = 8.83 (eps 1.5, 10 releases, D = 128), 99 "
                    "for the first release at its front-loaded z = 6.55 and 140 for the later ones at 9.26 "
                    "(prototype-first-share 2). In round 1 (`seeded`) the public random centres cut across "
                    "clusters and a bucket's rho is well below its clusters' (0.22 for clusters of 0.5); that is "
                    "what the larger first share pays for. From the second round on the server's merged centres "
                    "follow the clusters and rho rises (0.36-0.50 at cluster rho 0.5). More centres split a "
                    "4,000-image site into smaller buckets (C = 32: ~125 images each), so even whole-cluster "
                    "buckets stay below the bound at cluster rho 0.5: that is why the default is C = 8."]


if __name__ == "__main__":
    sys.exit(main())
