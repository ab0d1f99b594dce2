"""attar.condense.chunking: CPU row chunking gives the values of one whole-batch call; BatchNorm nets are never chunked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attar.condense.chunking as chunking
from attar.condense import CONDENSERS
from attar.condense.base import CondenseContext, embed_fn
from attar.condense.chunking import backward_rows, cpu_rows, forward_rows, mean_loss_grads
from attar.condense.dc import per_class_grads
from attar.condense.dm import dm_loss
from attar.data import load_data
from attar.models import build_model
from attar.specs import DataSpec, ModelSpec

pytestmark = pytest.mark.usefixtures("one_thread")

IN = ModelSpec(arch="convnet", width=8, depth=2)
BN = ModelSpec(arch="convnet", width=8, depth=2, args={"norm": "batchnorm"})


@pytest.fixture(scope="module")
def digits():
    return load_data(DataSpec(name="digits"))


def _net(b, spec=IN, seed=0):
    torch.manual_seed(seed)
    return build_model(spec, tuple(b.train.x.shape[1:]), 10, b.mean, b.std)


def _close(a, b, tol=1e-5):
    """Equal up to float rounding, relative to the larger tensor's scale."""
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def test_cpu_rows_only_for_cpu_nets_without_batchnorm(digits):
    assert cpu_rows(_net(digits), "cpu") == chunking.CPU_ROWS
    assert cpu_rows(_net(digits, BN), "cpu") is None
    assert cpu_rows(_net(digits), torch.device("cuda")) is None  # a device type check only: no GPU needed


def test_batchnorm_in_training_mode_is_why_bn_nets_are_not_chunked(digits):
    net = _net(digits, BN).train()
    x = digits.train.x[:70]
    assert not _close(forward_rows(net, x, 32), net(x), 1e-3)  # batch statistics couple the rows


def test_forward_rows_equals_one_call_with_an_uneven_last_chunk(digits):
    net = _net(digits).eval()
    x = digits.train.x[:70]  # chunks of 32, 32, 6
    with torch.no_grad():
        whole, parts = net(x), forward_rows(net, x, 32)
    assert parts.shape == whole.shape and _close(parts, whole)
    assert forward_rows(net, x, None) is not None and _close(forward_rows(net, x, 100), whole)


def test_dm_loss_and_its_image_gradient_are_unchanged_by_chunking(digits):
    net = _net(digits).train()
    for q in net.parameters():
        q.requires_grad_(False)
    xr = digits.train.x[:100]  # 10 "classes" of 10 rows, chunked by 16 across class boundaries
    xs0 = digits.train.x[100:120]
    losses, grads = [], []
    for rows in (None, 16):
        xs = xs0.clone().requires_grad_(True)
        loss = dm_loss(embed_fn(net), xr, xs, 10, rows=rows)
        loss.backward()
        losses.append(loss.detach())
        grads.append(xs.grad)
    assert _close(losses[1], losses[0]) and _close(grads[1], grads[0])


def test_mean_loss_grads_and_backward_rows_equal_the_whole_batch_gradient(digits):
    net = _net(digits)
    ps = list(net.parameters())
    x, y = digits.train.x[:50], digits.train.y[:50]
    loss_fn = lambda a, b: F.cross_entropy(net(a), b)  # noqa: E731
    whole = torch.autograd.grad(loss_fn(x, y), ps)
    chunked = mean_loss_grads(loss_fn, x, y, ps, 16)  # 16, 16, 16, 2 rows: weights 16/50 and 2/50
    scale = max(float(g.abs().max()) for g in whole)
    for g, h in zip(chunked, whole):
        assert float((g - h).abs().max()) <= 1e-5 * scale
    for q in ps:
        q.grad = None
    backward_rows(loss_fn, x, y, 16)
    for q, h in zip(ps, whole):
        assert float((q.grad - h).abs().max()) <= 1e-5 * scale
    # Unweighted chunks would give a different (wrong) gradient: the weights matter.
    naive = [sum(gs) for gs in zip(*(torch.autograd.grad(loss_fn(a, b), ps) for a, b in zip(x.split(16), y.split(16))))]
    assert float((naive[-1] - whole[-1]).abs().max()) > 1e-3 * scale


def test_per_class_grads_real_side_chunked_equals_unchunked(digits):
    net = _net(digits)
    params = {k: v.detach() for k, v in net.named_parameters()}
    x = digits.train.x[:60]
    y = torch.arange(3).repeat_interleave(20)
    a = per_class_grads(net, params, x, y, 3, "loop")
    b = per_class_grads(net, params, x, y, 3, "loop", rows=8)
    scale = max(float(v.abs().max()) for v in a.values())
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape and float((a[k] - b[k]).abs().max()) <= 1e-5 * scale


@pytest.mark.parametrize("method,params", [
    ("dm", {"batch_real": 40}),
    ("datadam", {"batch_real": 40}),
    ("dc", {"batch_real": 40, "outer_loop": 2, "inner_loop": 2}),
])
def test_condensed_images_do_not_depend_on_the_chunk_size(digits, monkeypatch, method, params):
    def run(rows):
        monkeypatch.setattr(chunking, "CPU_ROWS", rows)
        ctx = CondenseContext(x=digits.train.x[:800], y=digits.train.y[:800], num_classes=10, ipc=5, iterations=2,
                              seed=0, model=IN, mean=digits.mean, std=digits.std)
        return CONDENSERS.get(method)(params).run(ctx).x

    chunked, whole = run(16), run(10**9)  # 400 real rows, 50 synthetic rows: chunked by 16 vs one call
    assert _close(chunked, whole, 1e-4)
