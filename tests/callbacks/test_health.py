from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping
from torch import nn

from sslprobe import AlphaReQ, LiDAR, Module, RankMe
from sslprobe.callbacks.health import RowStore, row_store
from tests.conftest import D_EMB, D_IN, dict_loader, make_module, make_trainer, make_xy
from tests.probes.test_spectra import RTOL, np_alpha_req, np_lidar, np_rankme


def train_rows(model: nn.Module, n: int = 48) -> torch.Tensor:
    with torch.no_grad():
        return model.backbone(make_xy(n)[0])


def views_forward(self: Module, batch: dict, stage: str) -> dict:
    x = batch["x"]
    views = [self.backbone(x), self.backbone(0.8 * x + 0.3), self.backbone(x.flip(1))]
    return {"views": views, "stacked": torch.stack(views, dim=1)}


def views_module() -> Module:
    torch.manual_seed(0)
    return Module(forward=views_forward, backbone=nn.Sequential(nn.Linear(D_IN, D_EMB), nn.Tanh()), optim=None)


def views_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return views_forward(model, {"x": x}, "val")["stacked"]  # (n, q, D)


def test_rankme_and_alpha_req_share_one_store_and_match_numpy():
    model = make_module(optim=None)
    rank = RankMe(model, "rankme", input="embedding", queue_size=32)
    alpha = AlphaReQ(model, "alpha", input="embedding", queue_size=1000, fit_range=(0, 100))
    trainer = make_trainer(callbacks=[rank, alpha])
    trainer.fit(model, dict_loader(), dict_loader(n=16, seed=1))
    assert rank._store is alpha._store is row_store(model, ("rows", "embedding"))
    assert rank._store.queue_size == 1000 and rank._store.local().shape == (48, D_EMB)  # the largest asked for
    rows = train_rows(model).double().numpy()
    got = trainer.callback_metrics
    assert got["eval/rankme"].item() == pytest.approx(np_rankme(rows[-32:]), rel=RTOL)  # its most recent 32 rows
    assert got["eval/alpha"].item() == pytest.approx(np_alpha_req(rows, (0, 100)), rel=RTOL)


def test_source_val_computes_on_that_validations_rows():
    model = make_module(optim=None)
    rank = RankMe(model, "rankme", input="embedding", source="val")
    alpha = AlphaReQ(model, "alpha", input="embedding", source="val", fit_range=(2, 12))
    trainer = make_trainer(callbacks=[rank, alpha])
    trainer.fit(model, dict_loader(), dict_loader(n=24, seed=1))
    assert rank._store is None
    with torch.no_grad():
        rows = model.backbone(make_xy(24, seed=1)[0]).double().numpy()
    assert trainer.callback_metrics["eval/rankme"].item() == pytest.approx(np_rankme(rows), rel=RTOL)
    assert trainer.callback_metrics["eval/alpha"].item() == pytest.approx(np_alpha_req(rows, (2, 12)), rel=RTOL)


@pytest.mark.parametrize("input", ["views", "stacked"])
def test_lidar_matches_numpy_on_the_stored_samples(input):
    model = views_module()
    callback = LiDAR(model, "lidar", input=input, queue_size=40)
    trainer = make_trainer(callbacks=[callback])
    trainer.fit(model, dict_loader(), dict_loader(n=16, seed=1))
    views = views_of(model, make_xy(48)[0])[-40:].numpy()
    assert trainer.callback_metrics["eval/lidar"].item() == pytest.approx(np_lidar(views), rel=RTOL)


def test_lidar_groups_views_by_sample_whatever_the_batch_order():
    values = []
    for shuffle in (False, True):
        model = views_module()
        trainer = make_trainer(callbacks=[LiDAR(model, "lidar", input="views")])
        torch.manual_seed(1)
        trainer.fit(model, dict_loader(shuffle=shuffle), dict_loader(n=16, seed=1))
        values.append(trainer.callback_metrics["eval/lidar"].item())
    expected = np_lidar(views_of(views_module(), make_xy(48)[0]).numpy())
    assert values == pytest.approx([expected, expected], rel=RTOL)


def test_row_store_keeps_the_most_recent_finite_rows():
    store = RowStore()
    store.want(10)
    for i in range(4):
        store.push(torch.full((4, 2), float(i)))
    assert store.local()[:, 0].tolist() == [1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    rows = torch.arange(8.0).view(4, 2)
    rows[1, 0] = math.nan
    rows[3, 1] = math.inf
    store.push(rows)
    assert store.local()[-2:].tolist() == [[0, 1], [4, 5]]
    assert store.recent(3)[:, 0].tolist() == [3, 0, 4]
    assert store.claims("a") and not store.claims("a") and store.claims("b")


def test_nothing_is_logged_in_the_sanity_check_and_early_stopping_can_monitor_it():
    seen = {}

    class Spy(pl.Callback):
        def on_sanity_check_end(self, trainer, pl_module):
            seen["sanity"] = set(trainer.callback_metrics)

    model = make_module()
    rank = RankMe(None, "rankme", input="embedding")
    stop = EarlyStopping(monitor="eval/rankme", mode="max", patience=5)
    trainer = make_trainer(callbacks=[rank, Spy(), stop], num_sanity_val_steps=2, max_epochs=2)
    trainer.fit(model, dict_loader(), dict_loader(n=16, seed=1))
    assert "eval/rankme" not in seen["sanity"]
    assert "eval/rankme" in trainer.callback_metrics
    assert "rankme" in model.callbacks_metrics  # bound at setup


def test_too_few_rows_warns_and_logs_nothing():
    model = make_module(optim=None)
    alpha = AlphaReQ(model, "alpha", input="embedding", fit_range=(20, 100))
    trainer = make_trainer(callbacks=[alpha])
    with pytest.warns(
        UserWarning, match=r"AlphaReQ\(name='alpha'\): eval/alpha is not logged: .*fit_range=\(20, 100\)"
    ):
        trainer.fit(model, dict_loader(), dict_loader(n=16, seed=1))
    assert "eval/alpha" not in trainer.callback_metrics


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: RankMe(None, "r", "h", queue_size=0), ValueError, "queue_size must be a positive int, got 0"),
        (lambda: RankMe(None, "r", "h", queue_size=2.0), TypeError, "queue_size must be a positive int"),
        (lambda: RankMe(None, "r", "h", eps=-1.0), ValueError, "eps must be finite and >= 0"),
        (lambda: RankMe(None, "r", "h", source="test"), ValueError, "source must be one of 'train', 'val'"),
        (lambda: AlphaReQ(None, "a", "h", fit_range=(3, 4)), ValueError, r"AlphaReQ\(name='a'\): fit_range must be"),
        (lambda: LiDAR(None, "l", "h", delta=0.0), ValueError, "delta must be finite and > 0"),
        (lambda: LiDAR(None, "l", "h", delta="x"), TypeError, "delta must be a number > 0"),
        (lambda: RankMe(None, None, "h"), TypeError, "name is required"),
        (lambda: RankMe(None, "r", None), TypeError, "input must be"),
    ],
)
def test_argument_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_a_duplicate_name_is_rejected():
    model = make_module()
    RankMe(model, "health", input="embedding")
    with pytest.raises(ValueError, match="already used"):
        AlphaReQ(model, "health", input="embedding")


@pytest.mark.parametrize(
    ("forward", "match"),
    [
        (lambda self, b: {"v": self.backbone(b["x"])}, r"has shape \(8, 16\).*A single view"),
        (lambda self, b: {"v": [self.backbone(b["x"])]}, "list of 1 item"),
        (lambda self, b: {"v": [self.backbone(b["x"]), self.backbone(b["x"])[:, :3]]}, r"shapes \[\(8, 16\), \(8, 3\)"),
    ],
)
def test_lidar_input_errors_say_what_is_expected(forward, match):
    torch.manual_seed(0)
    model = Module(forward=lambda self, batch, stage: forward(self, batch), backbone=nn.Linear(D_IN, D_EMB), optim=None)
    trainer = make_trainer(callbacks=[LiDAR(model, "lidar", input="v")])
    with pytest.raises(RuntimeError, match=match):
        trainer.fit(model, dict_loader(), dict_loader(n=16, seed=1))


def test_test_and_validate_with_source_val_log_on_their_own_rows():
    model = make_module(optim=None)
    rank = RankMe(model, "rankme", input="embedding", source="val")
    alpha = AlphaReQ(model, "alpha", input="embedding", source="val", fit_range=(2, 12))
    trainer = make_trainer(callbacks=[rank, alpha])
    trainer.test(model, dict_loader(n=24, seed=2))
    with torch.no_grad():
        rows = model.backbone(make_xy(24, seed=2)[0]).double().numpy()
    assert trainer.callback_metrics["test/rankme"].item() == pytest.approx(np_rankme(rows), rel=RTOL)
    assert trainer.callback_metrics["test/alpha"].item() == pytest.approx(np_alpha_req(rows, (2, 12)), rel=RTOL)
    assert "eval/rankme" not in trainer.callback_metrics
    trainer = make_trainer(callbacks=[rank, alpha])
    trainer.validate(model, dict_loader(n=16, seed=3))  # no fit before: validation rows need none
    with torch.no_grad():
        rows = model.backbone(make_xy(16, seed=3)[0]).double().numpy()
    assert trainer.callback_metrics["eval/rankme"].item() == pytest.approx(np_rankme(rows), rel=RTOL)


def test_source_train_without_training_warns_once_and_logs_nothing():
    model = make_module(optim=None)
    rank = RankMe(model, "rankme", input="embedding")
    lidar = LiDAR(model, "lidar", input="embedding")  # never reached: no training batch
    trainer = make_trainer(callbacks=[rank, lidar])
    with pytest.warns(UserWarning, match=r"RankMe\(name='rankme'\): 0 finite train rows .*or pass source='val'"):
        trainer.validate(model, dict_loader(n=16, seed=1))
    assert not {"eval/rankme", "eval/lidar"} & set(trainer.callback_metrics)


def test_test_with_source_train_says_why_nothing_is_logged():
    model = make_module(optim=None)
    rank = RankMe(model, "rankme", input="embedding", queue_size=32)
    trainer = make_trainer(callbacks=[rank])
    trainer.fit(model, dict_loader(), dict_loader(n=16, seed=1))
    logged = trainer.callback_metrics["eval/rankme"].item()
    with pytest.warns(UserWarning, match=r"test/rankme is not logged: .*source='train'.*Pass source='val'"):
        trainer.test(model, dict_loader(n=16, seed=2))
    assert "test/rankme" not in trainer.callback_metrics
    trainer.validate(model, dict_loader(n=16, seed=1))  # after fit: the training rows are still stored
    assert trainer.callback_metrics["eval/rankme"].item() == pytest.approx(logged, rel=RTOL)


def test_row_store_keeps_row_shapes_and_starts_empty_on_the_given_device():
    store = RowStore()
    store.want(4)
    assert store.local("meta").device.type == "meta" and store.local().numel() == 0
    views = torch.arange(24.0).view(3, 2, 4)
    views[1, 1, 2] = math.nan
    store.push(views)
    assert store.local().shape == (2, 2, 4)
    assert torch.equal(store.local(), views[[0, 2]])
    store.begin()
    assert torch.equal(store.recent(1), views[[2]])
