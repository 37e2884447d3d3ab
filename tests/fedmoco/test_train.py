"""The training loop's guards: split BN stays on for every batch, loaders persist across epochs."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch

from fedmoco.config import MoCoConfig, TrainConfig
from fedmoco.encoders import SplitBatchNorm
from fedmoco.errors import FedmocoError
from fedmoco.metrics import JsonlLogger, read_jsonl
from fedmoco.moco import MoCo
from fedmoco.train import (BaseBatch, BaseCollate, CpuViewsCollate, EpochShuffle, Trainer, batched_views_for,
                           guarded_size, make_loader, parallel_copy_)


def _model(norm="split-batch", splits=4):
    torch.manual_seed(0)
    cfg = MoCoConfig(arch="tiny", in_channels=1, small_input=True, queue_size=64, hidden_dim=32, dim=16,
                     norm=norm, norm_splits=splits)
    return MoCo(cfg)


def _dependents(fn, x: torch.Tensor) -> list[set[int]]:
    """For each output row i, the input rows j whose change moves row i."""
    base = fn(x)
    deps: list[set[int]] = [set() for _ in range(len(x))]
    for j in range(len(x)):
        x2 = x.clone()
        x2[j] += 3.0 * torch.randn_like(x2[j])
        moved = (fn(x2) - base).abs().amax(dim=1) > 1e-5
        for i in torch.nonzero(moved).flatten().tolist():
            deps[i].add(j)
    return deps


def test_positive_pair_never_shares_batch_statistics():
    model = _model(splits=4).train()
    x = torch.rand(16, 1, 12, 12)
    with torch.no_grad():
        q_deps = _dependents(model._query, x)
        torch.manual_seed(1)
        # _key draws a fresh shuffle per call: fix it by reseeding before each call.
        k_deps = _dependents(lambda t: (torch.manual_seed(1), model._key(t))[1], x)
    for i in range(16):
        assert len(q_deps[i]) == 4 and i in q_deps[i]  # its own sub-batch only, not all 16
        assert len(k_deps[i]) == 4 and i in k_deps[i]
        # The query of image i and its positive key are normalised with different groups.
        assert q_deps[i] != k_deps[i]
    # With plain BN every output depends on the whole batch: the leak the guard removes.
    plain = _model(norm="batch").train()
    with torch.no_grad():
        assert all(len(d) == 16 for d in _dependents(plain._query, x))


def test_guarded_size_keeps_at_least_half_the_splits():
    assert guarded_size(32, 8) == 32
    assert guarded_size(31, 8) == 30  # 31 is prime: drop one image, 6 sub-batches of 5
    assert guarded_size(29, 8) == 28
    assert guarded_size(17, 4) == 16
    assert guarded_size(3, 8) == 3  # 3 sub-batches of one
    assert guarded_size(1, 8) == 0


def test_prime_batch_is_trimmed_and_still_split(caplog):
    model = _model(splits=8)
    seen = []
    bn = next(m for m in model.encoder_q.modules() if isinstance(m, SplitBatchNorm))
    bn.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    x = torch.rand(31, 1, 12, 12)
    loader = [((x, x.clone()), 1)]  # 32 minus one unreadable image
    trainer = Trainer(model, TrainConfig(batch_size=32, epochs=1, num_workers=0), torch.device("cpu"),
                      total_steps=1, steps_per_epoch=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the whole-batch fallback warns; it must not happen
        summary = trainer.train_epoch(loader)
    assert seen == [30]
    assert summary.images == 30 and summary.steps == 1 and summary.skipped == 1


def test_split_batchnorm_warns_when_it_cannot_split():
    bn = SplitBatchNorm(2, splits=4).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bn(torch.randn(7, 2, 3, 3))  # 7 has a divisor <= 4 only in 1: whole-batch BN
    assert any("cannot be split" in str(w.message) for w in caught)


def test_plain_batch_norm_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="fedmoco.train"):
        Trainer(_model(norm="batch"), TrainConfig(num_workers=0), torch.device("cpu"), total_steps=1,
                steps_per_epoch=1, progress=False)
    assert "norm=batch on one device" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedmoco.train"):
        Trainer(_model(norm="group"), TrainConfig(num_workers=0), torch.device("cpu"), total_steps=1,
                steps_per_epoch=1, progress=False)
    assert "norm=batch" not in caplog.text


def test_epoch_shuffle_is_fixed_by_seed_and_epoch():
    s = EpochShuffle(50, seed=3)
    s.set_epoch(0)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    s.set_epoch(0)
    assert list(s) == first and first != second and sorted(second) == list(range(50))


def test_loader_workers_persist_across_epochs():
    data = [(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4))] * 8
    loader = make_loader(data, TrainConfig(batch_size=4, num_workers=1), torch.device("cpu"))
    assert loader.persistent_workers
    assert not make_loader(data, TrainConfig(batch_size=4, num_workers=0), torch.device("cpu")).persistent_workers


def _run_epoch(tmp_path, read_every: int, *, log_every: int = 1, poison: int | None = None):
    torch.manual_seed(0)
    model = _model(norm="group")
    data = [(torch.rand(1, 12, 12), torch.rand(1, 12, 12)) for _ in range(40)]
    if poison is not None:
        data[poison] = (torch.full((1, 12, 12), float("nan")), torch.full((1, 12, 12), float("nan")))
    cfg = TrainConfig(batch_size=4, num_workers=0, lr=0.05, log_every=log_every)
    path = tmp_path / f"metrics-{read_every}-{log_every}-{poison}.jsonl"
    trainer = Trainer(model, cfg, torch.device("cpu"), total_steps=10, steps_per_epoch=10,
                      logger=JsonlLogger(path), progress=False)
    trainer.read_every = read_every  # what a CUDA Trainer uses (READ_EVERY_CUDA), here on CPU
    summary = trainer.train_epoch(make_loader(data, cfg, torch.device("cpu")))
    return summary, list(read_jsonl(path)) if path.exists() else []


def test_reading_statistics_every_few_steps_logs_the_same_records(tmp_path):
    one, rec_one = _run_epoch(tmp_path, 1)
    four, rec_four = _run_epoch(tmp_path, 4)  # 10 steps: reads after steps 4, 8 and at the end
    assert [r["step"] for r in rec_four] == list(range(10))
    for a, b in zip(rec_one, rec_four):
        for key in ("epoch", "step", "loss", "pos_mean", "neg_mean", "neg_var", "emb_std", "lr", "momentum"):
            assert a[key] == b[key], key
        assert b["images_per_s"] > 0
    # steps read together share one rate: their images over their common wall time
    assert rec_four[0]["images_per_s"] == rec_four[3]["images_per_s"] != rec_four[4]["images_per_s"]
    assert four.steps == one.steps == 10 and four.images == 40
    assert math.isclose(four.loss, one.loss) and four.neg_hist == one.neg_hist
    _, every_third = _run_epoch(tmp_path, 4, log_every=3)
    assert [r["step"] for r in every_third] == [2, 5, 8]


def test_a_diverged_loss_is_reported_with_its_step_when_read_late(tmp_path):
    messages = []
    for read_every in (1, 4):
        with pytest.raises(FloatingPointError, match=r"loss became nan at step \d; lower --lr, or look for "
                                                     r"extreme values in the data or the augmentation options \(if it trains with --no-cache, the "
                                                     r"decoded-sample cache is damaged: fedmoco cache --clear\)") as err:
            _run_epoch(tmp_path, read_every, poison=17)
        messages.append(str(err.value))
    assert messages[0] == messages[1]  # the first bad step, however late it was read
    # a user error, so the CLI prints it as one line (fedmoco.cli.main catches FedmocoError)
    assert isinstance(err.value, FedmocoError)


def test_optimizer_state_from_another_device_keeps_this_devices_kernel():
    model = _model(norm="group")
    cfg = TrainConfig(batch_size=4)
    cpu = Trainer(model, cfg, torch.device("cpu"), total_steps=4, steps_per_epoch=4, progress=False)
    assert not cpu.fused and cpu.optimizer.param_groups[0]["fused"] is None
    saved = cpu.state_dict()
    saved["optimizer"]["param_groups"][0]["fused"] = True  # as a CUDA Trainer saves it
    cpu.load_state_dict(saved)
    assert cpu.optimizer.param_groups[0]["fused"] is None
    assert torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, fused=True).param_groups[0]["fused"]


class _RecordingViews(torch.nn.Module):
    """Batched views (q = k = base * scale) that remember where they were moved."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(1))
        self.moved_to: list[torch.device] = []

    def to(self, *args, **kwargs):
        self.moved_to.append(torch.device(args[0]))
        return super().to(*args, **kwargs)

    def forward(self, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return base * self.scale, base.flip(-1) * self.scale


def test_the_trainer_moves_batched_views_to_its_device():
    # On a GPU the loader yields cached bases and the Trainer makes the views: their buffers
    # (means, kernels) must be on the Trainer's device, or the first batch fails with "found at
    # least two devices, cuda:0 and cpu" (as every GPU site did, found on an H200 on 2026-11-29).
    base = [torch.rand(1, 12, 12) for _ in range(8)]
    views = _RecordingViews()
    loader = torch.utils.data.DataLoader(base, batch_size=4, collate_fn=BaseCollate(views))
    cfg = TrainConfig(batch_size=4, num_workers=0)
    trainer = Trainer(_model(norm="group"), cfg, torch.device("cpu"), total_steps=2, steps_per_epoch=2, progress=False)
    assert trainer.train_epoch(loader).steps == 2
    assert views.moved_to == [torch.device("cpu")]
    # views made in the workers (CpuViewsCollate) stay where the workers run them
    cpu_views = _RecordingViews()
    trainer.train_epoch(torch.utils.data.DataLoader(base, batch_size=4, collate_fn=CpuViewsCollate(cpu_views)))
    assert cpu_views.moved_to == []


def test_resuming_with_amp_on_from_a_state_saved_with_amp_off():
    # a CPU run (or --no-amp) saves a disabled scaler's {}; an enabled scaler refused it
    # ("The source state dict is empty") when the run was resumed on a GPU
    cfg = TrainConfig(batch_size=4)
    saved = Trainer(_model(norm="group"), cfg, torch.device("cpu"), total_steps=4, steps_per_epoch=4,
                    progress=False).state_dict()
    assert saved["scaler"] == {}
    gpu_like = Trainer(_model(norm="group"), cfg, torch.device("cpu"), total_steps=4, steps_per_epoch=4, progress=False)
    gpu_like.scaler = torch.amp.GradScaler("cpu", enabled=True)  # AMP on, as on CUDA
    gpu_like.load_state_dict(saved)
    assert gpu_like.scaler.get_scale() == 2.0 ** 16  # the default starting scale


def test_momentum_buffers_take_the_layout_of_their_parameters():
    # a state saved in NCHW (a CPU run) loaded where the model is channels_last (CUDA with
    # plain BN): the fused CUDA SGD requires buffers with the parameters' strides
    cfg = TrainConfig(batch_size=4)
    cpu = Trainer(_model(norm="group"), cfg, torch.device("cpu"), total_steps=4, steps_per_epoch=4, progress=False)
    for p in cpu.optimizer.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    cpu.optimizer.step()
    saved = cpu.state_dict()
    other = Trainer(_model(norm="group"), cfg, torch.device("cpu"), total_steps=4, steps_per_epoch=4, progress=False)
    other.model.to(memory_format=torch.channels_last)
    other.load_optimizer_state(saved["optimizer"])
    convs = [p for p in other.optimizer.param_groups[0]["params"] if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    for i, p in enumerate(other.optimizer.param_groups[0]["params"]):
        buf = other.optimizer.state[p]["momentum_buffer"]
        assert buf.stride() == p.stride() and torch.equal(buf, saved["optimizer"]["state"][i]["momentum_buffer"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.bool])
def test_parallel_copy_copies_every_byte_in_slices(dtype):
    # the pin thread's copy of a large batch by several threads: 4 byte ranges, one shorter
    src = (torch.randn(5, 13, 7, 3) * 50).to(dtype)
    dst = torch.zeros_like(src)
    threads = torch.get_num_threads()
    assert parallel_copy_(dst, src, 4) is dst
    assert torch.equal(dst, src)
    assert torch.get_num_threads() == threads  # the pool leaves the training loop's thread count alone


def test_parallel_copy_refuses_a_strided_or_mismatched_tensor():
    src = torch.randn(4, 6)
    with pytest.raises(ValueError, match="contiguous"):
        parallel_copy_(torch.empty(6, 4).T, src, 2)
    with pytest.raises(ValueError, match=r"\(4, 6\) torch.float32 into \(4, 6\) torch.float16"):
        parallel_copy_(torch.empty(4, 6, dtype=torch.float16), src, 2)


class _OffersViews(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        return None

    def batched_views(self):
        return [torch.zeros(1, 4, 4)] * 4, _RecordingViews()


def test_pin_threads_reach_the_batches_a_cuda_loader_makes():
    with pytest.raises(FedmocoError, match="pin_threads"):
        TrainConfig(pin_threads=0)
    base, collate = batched_views_for(_OffersViews(), TrainConfig(pin_threads=4), torch.device("cuda"))
    batch, dropped = collate(list(base))
    assert type(collate) is BaseCollate and isinstance(batch, BaseBatch) and dropped == 0
    assert batch.pin_threads == 4 and batch[0].shape == (4, 1, 4, 4)


class _CountingPairs(torch.utils.data.Dataset):
    """View pairs that count their reads across loader worker processes."""

    def __init__(self, n: int) -> None:
        import multiprocessing

        self.n, self.reads = n, multiprocessing.Value("i", 0)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        with self.reads.get_lock():
            self.reads.value += 1
        return torch.rand(1, 12, 12), torch.rand(1, 12, 12)


def test_an_epoch_capped_by_max_steps_reads_only_its_batches():
    # with persistent workers, an epoch cut short by max_steps_per_epoch left its prefetched
    # batches in flight, and the next epoch's start waited for them and threw them away
    data = _CountingPairs(64)
    cfg = TrainConfig(batch_size=4, num_workers=1, max_steps_per_epoch=2)
    loader = make_loader(data, cfg, torch.device("cpu"), seed=5)
    assert len(loader) == 2
    trainer = Trainer(_model(norm="group"), cfg, torch.device("cpu"), total_steps=4, steps_per_epoch=2, progress=False)
    for epoch in range(2):
        assert trainer.train_epoch(loader, epoch=epoch).steps == 2
    assert data.reads.value == 2 * 2 * 4
    # each epoch still takes the first batches of that epoch's own permutation
    sampler = EpochShuffle(64, seed=5, limit=8)
    sampler.set_epoch(1)
    full = EpochShuffle(64, seed=5)
    full.set_epoch(1)
    assert list(sampler) == list(full)[:8] and len(sampler) == 8
