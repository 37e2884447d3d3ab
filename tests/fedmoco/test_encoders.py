import pytest
import torch

from fedmoco.encoders import SplitBatchNorm, build_backbone
from fedmoco.errors import ConfigError


@pytest.mark.parametrize("arch,out_dim", [("tiny", 128), ("resnet18", 512), ("resnet50", 2048)])
@pytest.mark.parametrize("channels", [1, 3, 13])
def test_backbones_take_any_channel_count(arch, out_dim, channels):
    net = build_backbone(arch, channels, small_input=True, norm="group")
    out = net(torch.randn(2, channels, 32, 32))
    assert out.shape == (2, out_dim) and net.out_dim == out_dim


def test_small_input_stem_keeps_resolution():
    big = build_backbone("resnet18", 3, small_input=False)
    small = build_backbone("resnet18", 3, small_input=True)
    assert big.conv1.kernel_size == (7, 7) and isinstance(big.maxpool, torch.nn.MaxPool2d)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)


def test_split_batchnorm_statistics_do_not_cross_sub_batches():
    torch.manual_seed(0)
    bn = SplitBatchNorm(4, splits=2).train()
    x = torch.randn(8, 4, 3, 3)
    y = bn(x)
    x2 = x.clone()
    x2[1::2] += 100.0  # change only sub-batch 1 (samples 1, 3, 5, 7)
    y2 = SplitBatchNorm(4, splits=2).train()(x2)
    assert torch.allclose(y[0::2], y2[0::2], atol=1e-5)  # sub-batch 0 unaffected
    # each sub-batch is normalised on its own: zero mean per channel within it
    assert torch.allclose(y[0::2].mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(y2[1::2].mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4)
    # odd batch falls back to a divisor of N rather than failing
    assert SplitBatchNorm(4, splits=4).train()(torch.randn(6, 4, 2, 2)).shape == (6, 4, 2, 2)


def test_split_batchnorm_on_a_1x1_map_uses_sub_batches_of_two_samples():
    """A sub-batch of one sample on a 1x1 map has one value per channel: batch_norm raised
    mid-run (tiny encoder at 8 px, batch 8; found by an audit). It now takes 4 sub-batches of 2
    (samples b and b+4), each normalised on its own."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 1, 1)
    y = SplitBatchNorm(3, splits=8).train()(x)
    for b in range(4):
        sub = x[b::4]  # (2, 3, 1, 1)
        ref = (sub - sub.mean(0)) / torch.sqrt(sub.var(0, unbiased=False) + 1e-5)
        assert torch.allclose(y[b::4], ref, atol=1e-5)
    # and a whole MoCo step at 8 px on a tiny encoder runs
    from fedmoco.config import MoCoConfig
    from fedmoco.moco import MoCo

    model = MoCo(MoCoConfig(arch="tiny", small_input=True, dim=8, hidden_dim=16, queue_size=16)).train()
    out = model(torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8))
    assert torch.isfinite(out.loss)


def test_split_batchnorm_eval_matches_plain_batchnorm_with_same_stats():
    bn = SplitBatchNorm(3, splits=2)
    bn.running_mean.fill_(0.5)
    bn.running_var.fill_(4.0)
    ref = torch.nn.BatchNorm2d(3).eval()
    ref.load_state_dict(bn.state_dict())
    x = torch.randn(4, 3, 2, 2)
    assert torch.allclose(bn.eval()(x), ref(x))


def test_unknown_arch_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown architecture 'vit'"):
        build_backbone("vit", 3)


def test_split_batchnorm_gives_same_result_on_channels_last_input():
    # NCHW groups samples b, b+s, ... (reshape); channels_last groups contiguous blocks
    # (one cuDNN call per block). Same maths: feed NCHW the batch reordered so its
    # interleaved groups are the blocks, and every output, statistic and gradient matches.
    torch.manual_seed(0)
    s, m = 2, 4
    a, b = SplitBatchNorm(4, splits=s).train(), SplitBatchNorm(4, splits=s).train()
    with torch.no_grad():
        a.weight.uniform_()
        a.bias.uniform_()
    b.load_state_dict(a.state_dict())
    x = torch.randn(s * m, 4, 5, 5)
    order = torch.tensor([blk * m + j for j in range(m) for blk in range(s)])  # NCHW row -> block sample
    xa = x[order].clone().requires_grad_()
    xb = x.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    ya, yb = a(xa), b(xb)
    assert yb.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(ya, yb[order], atol=1e-5)
    assert torch.allclose(a.running_mean, b.running_mean, atol=1e-6)
    assert torch.allclose(a.running_var, b.running_var, atol=1e-5)
    ya.square().sum().backward()
    yb.square().sum().backward()
    assert torch.allclose(xa.grad, xb.grad[order], atol=1e-4)


def test_compiled_channels_last_split_batchnorm_matches_one_cudnn_call_per_sub_batch():
    # The torch.compile'd path (one fused normalisation of all sub-batches) must give what the
    # per-sub-batch path gives: outputs, running statistics and every gradient.
    torch.manual_seed(0)
    a, b = SplitBatchNorm(6, splits=4).train(), SplitBatchNorm(6, splits=4).train()
    with torch.no_grad():
        a.weight.uniform_(0.5, 2)
        a.bias.uniform_(-1, 1)
        a.running_var.fill_(3.0)
    b.load_state_dict(a.state_dict())
    b.compiled = True
    x = (torch.randn(16, 6, 5, 7) * 3 + 1).contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    assert yb.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(yb, ya, atol=1e-5, rtol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-6, rtol=1e-6)
    grad = torch.randn_like(ya)
    (ya * grad).sum().backward()
    (yb * grad).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.weight.grad, a.weight.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(b.bias.grad, a.bias.grad, atol=1e-4, rtol=1e-5)
    # and sub-batches stay apart: changing the last block moves no output of the first three
    x2 = x.clone()
    x2[12:] += 100.0
    torch.testing.assert_close(b(x2)[:12], b(x)[:12], atol=1e-5, rtol=1e-5)


def test_compiled_split_batchnorm_serves_a_whole_resnet_with_and_without_grad():
    # Every layer shares one compiled function: 4 widths x 2 spatial sizes x grad on (query)
    # and off (key) once passed Dynamo's recompile limit (fullgraph: a hard error on the GPU).
    # The eager backend runs Dynamo's guards and recompiles without compiling kernels.
    torch.manual_seed(0)
    net = build_backbone("resnet18", 3, norm="split-batch", norm_splits=2)
    ref = build_backbone("resnet18", 3, norm="split-batch", norm_splits=2)
    ref.load_state_dict(net.state_dict())
    for m in net.modules():
        if isinstance(m, SplitBatchNorm):
            m.compiled, m.compile_backend = True, "eager"
    net, ref = net.to(memory_format=torch.channels_last), ref.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    for grad in (True, False, True):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(net(x), ref(x), atol=1e-4, rtol=1e-4)


def test_compiled_split_batchnorm_keeps_a_double_modules_running_statistics():
    # the compiled statistics are float32: lerp into float64 running buffers raised a dtype error
    torch.manual_seed(0)
    a, b = SplitBatchNorm(3, splits=2).double().train(), SplitBatchNorm(3, splits=2).double().train()
    b.compiled, b.compile_backend = True, "eager"
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(b(x), a(x).to(torch.float64), atol=1e-5, rtol=1e-5)
    assert b.running_mean.dtype == torch.float64
    torch.testing.assert_close(b.running_var, a.running_var, atol=1e-6, rtol=1e-6)
