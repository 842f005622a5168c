"""StateWatch (resnet_fused/state_watch.py) and its compiled TensorWatch: what counts as a
change of a model's parameters and buffers, and what does not."""

import pytest
import torch
from torch import nn

from resnet_fused import _extension, state_watch


def _model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


def _changes():
    def in_place(m):
        with torch.no_grad():
            m[0].weight.mul_(2.0)

    def buffer_in_place(m):
        m[1].running_var.add_(1.0)

    def new_storage(m):  # bypasses the version counter; the address moves
        m[0].weight.data = m[0].weight.detach() * 2.0

    def assigned(m):
        m[0].bias = nn.Parameter(torch.zeros(4))

    def set_to_none(m):
        m[0].bias = None

    def eps(m):
        m[1].eps = 1e-3

    def hook(m):
        m[2].register_forward_hook(lambda *a: None)

    def replaced(m):
        m[2] = nn.GELU()
    return [in_place, buffer_in_place, new_storage, assigned, set_to_none, eps, hook, replaced]


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("change", _changes(), ids=lambda f: f.__name__)
def test_a_change_is_seen(monkeypatch, compiled, change):
    if compiled and not _extension.available():
        pytest.skip("extension not built")
    monkeypatch.setattr(_extension, "available", lambda: compiled)
    m = _model().eval()
    watch = state_watch.StateWatch(m)
    assert not watch.changed()
    m(torch.randn(1, 3, 5, 5))  # an eval forward writes nothing
    with torch.inference_mode():
        m(torch.randn(1, 3, 5, 5))
    assert not watch.changed()
    change(m)
    assert watch.changed()


@pytest.mark.skipif(not _extension.available(), reason="extension not built")
def test_tensor_watch_reads_versions_and_addresses():
    a, b = torch.zeros(3), torch.zeros(4)
    with torch.inference_mode():
        c = torch.zeros(2)  # no version counter: only its storage is watched
    watch = torch.classes.resnet_fused.TensorWatch([a, b, c])
    assert not watch.changed()
    with torch.inference_mode():
        c.add_(1.0)
    assert not watch.changed()
    b.add_(1.0)
    assert watch.changed()
    watch = torch.classes.resnet_fused.TensorWatch([a, b])
    b.data = torch.zeros(4)
    assert watch.changed()
