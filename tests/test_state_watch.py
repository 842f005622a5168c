"""StateWatch (resnet_fused/state_watch.py) and its compiled check (csrc/state_watch.cpp):
what counts as a change of a model's parameters and buffers, and what does not."""

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

    def hook_on_the_model(m):  # watched through its hook dicts, not the model
        m.register_forward_pre_hook(lambda *a: None)

    def hooks_of_the_model_replaced(m):
        m._forward_hooks = type(m._forward_hooks)()

    def replaced(m):
        m[2] = nn.GELU()
    return [in_place, buffer_in_place, new_storage, assigned, set_to_none, eps, hook,
            hook_on_the_model, hooks_of_the_model_replaced, replaced]


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


def _compiled_watch(tensors, slots=(), norms=(), modules=()):
    return _extension._C.state_watch(list(tensors), list(slots), list(norms), list(modules))


@pytest.mark.skipif(not _extension.available(), reason="extension not built")
def test_the_compiled_check_reads_versions_and_addresses():
    a, b = torch.zeros(3), torch.zeros(4)
    with torch.inference_mode():
        c = torch.zeros(2)  # no version counter: only its storage is watched
    watch = _compiled_watch([a, b, c])
    assert not _extension._C.state_changed(watch)
    with torch.inference_mode():
        c.add_(1.0)
    assert not _extension._C.state_changed(watch)
    b.add_(1.0)
    assert _extension._C.state_changed(watch)
    watch = _compiled_watch([a, b])
    b.data = torch.zeros(4)
    assert _extension._C.state_changed(watch)


@pytest.mark.skipif(not _extension.available(), reason="extension not built")
def test_the_compiled_check_reads_slots_eps_and_hooks():
    m = _model()
    slots = [(m[0]._parameters, "weight", m[0].weight)]
    watch = _compiled_watch([], slots, [m[1]], [vars(sub) for sub in m.modules()])
    assert not _extension._C.state_changed(watch)
    m[1].eps = float(m[1].eps)  # an equal value is no change
    assert not _extension._C.state_changed(watch)
    handle = m[2].register_forward_pre_hook(lambda *a: None)
    assert _extension._C.state_changed(watch)
    handle.remove()
    assert not _extension._C.state_changed(watch)
    del m[0].weight
    assert _extension._C.state_changed(watch)


@pytest.mark.skipif(not _extension.available(), reason="extension not built")
def test_the_compiled_check_rejects_bad_arguments():
    with pytest.raises(TypeError, match="expected tensors, got list at index 1"):
        _compiled_watch([torch.zeros(1), []])
    with pytest.raises(TypeError, match=r"expected slots as \(dict, key, tensor\), got tuple"):
        _compiled_watch([], [({}, "w")])
    with pytest.raises(AttributeError, match="eps"):
        _compiled_watch([], [], [nn.ReLU()])
    with pytest.raises(TypeError, match="expected a sequence of modules' __dict__"):
        _extension._C.state_watch([], [], [], 3)
    with pytest.raises(TypeError, match="expected modules' __dict__, got ReLU at index 0"):
        _compiled_watch([], [], [], [nn.ReLU()])
    with pytest.raises(AttributeError, match="_forward_hooks"):
        _compiled_watch([], [], [], [{}])
    with pytest.raises(ValueError):
        _extension._C.state_changed(object())
