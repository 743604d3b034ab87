import pytest

from cpt.training.schedule import lr_at


def test_cosine_rewarm_then_decay_to_min():
    kw = dict(max_lr=1.0, min_lr=0.1, total_steps=100, warmup_steps=10)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    lrs = [lr_at(s, **kw) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(100, **kw) == pytest.approx(0.1)


def test_wsd_holds_then_decays_linearly():
    kw = dict(max_lr=1.0, min_lr=0.0, total_steps=100, warmup_steps=10, schedule="wsd", decay_steps=20)
    assert lr_at(50, **kw) == 1.0
    assert lr_at(79, **kw) == 1.0
    assert lr_at(90, **kw) == pytest.approx(0.5)
    assert lr_at(100, **kw) == pytest.approx(0.0)


def test_unknown_schedule():
    with pytest.raises(ValueError):
        lr_at(0, max_lr=1, min_lr=0, total_steps=1, warmup_steps=0, schedule="linear")
