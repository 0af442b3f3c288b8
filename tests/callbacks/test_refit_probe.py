from __future__ import annotations

import numpy as np
import pytest
import torch
import torchmetrics
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers.logger import Logger
from sklearn.linear_model import RidgeClassifier
from torch import nn

from sslprobe import Module
from sslprobe.callbacks import RefitProbe
from sslprobe.probes.ridge import DEFAULT_LAMBDAS
from tests.conftest import D_EMB, D_IN, NUM_CLASSES, DictDataset, make_module, make_trainer
from tests.probes.test_ridge import brute_force_gcv, standardise

# ---------------------------------------------------------------------------------------------- helpers


def make_data(n, seed, spread=0.5):
    """Overlapping classes around fixed centres (the same for every seed), so that accuracy is neither 0 nor 1."""
    centers = torch.randn(NUM_CLASSES, D_IN, generator=torch.Generator().manual_seed(100)) * spread
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % NUM_CLASSES
    return centers[y] + torch.randn(n, D_IN, generator=g), y


def loader(x, y, batch_size=8, shuffle=False):
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.DataLoader(DictDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=g)


def embed(model, x):
    with torch.no_grad():
        return model.backbone(x)


def reference(f_tr, y_tr, f_va, y_va, lambdas=DEFAULT_LAMBDAS):
    """scikit-learn on the usable rows: lambda by a brute-force GCV over the grid, then RidgeClassifier(lambda * n).

    Returns (accuracy on the usable eval rows, lambda, scores of every eval row).
    """
    f_tr, f_va = f_tr.double(), f_va.double()
    keep = (y_tr >= 0) & torch.isfinite(f_tr).all(1)
    f_tr, y_tr = f_tr[keep], y_tr[keep]
    z, mean, std = standardise(f_tr)
    gcv, _ = brute_force_gcv(z, y_tr.numpy(), NUM_CLASSES, lambdas)
    lam = lambdas[int(np.argmin(gcv))]
    model = RidgeClassifier(alpha=lam * len(y_tr)).fit(z, y_tr.numpy())
    z_va = (f_va.numpy() - mean) / std
    usable = ((y_va != -100) & torch.isfinite(f_va).all(1)).numpy()
    accuracy = model.score(z_va[usable], y_va.numpy()[usable])
    return accuracy, lam, model.decision_function(np.nan_to_num(z_va))


class MemoryLogger(Logger):
    """Keeps every logged row, to compare what two runs logged."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append({k: float(v) for k, v in metrics.items()})

    def values(self, prefix: str) -> list[dict[str, float]]:
        return [
            {k: v for k, v in row.items() if k.startswith(prefix)} for row in self.rows if any(prefix in k for k in row)
        ]


class Windows(Callback):
    """Records the training rows of each window (between validations) and each validation's features."""

    def __init__(self) -> None:
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.windows: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.evals: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        self.fits: list = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append((outputs["embedding"].detach().clone(), batch["label"].clone()))

    def on_validation_epoch_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.windows.append((torch.cat([r[0] for r in self.rows]), torch.cat([r[1] for r in self.rows])))
            self.rows = []
            self.evals.append([])

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.evals[-1].append((outputs["embedding"].clone(), batch["label"].clone()))


def fit_refit(train, val, *, max_epochs=1, model=None, callbacks=(), trainer_kw=None, **kw):
    """A frozen backbone (optim=None) probed by RefitProbe, unless a model is given.

    Evaluation is standardised as the fitted rows were (``eval_stats="train"``), the plain scikit-learn pipeline these
    tests compare with, unless ``eval_stats`` is given.
    """
    kw.setdefault("eval_stats", "train")
    model = make_module(optim=None) if model is None else model
    refit = RefitProbe(model, "refit", "embedding", "label", num_classes=NUM_CLASSES, **kw)
    logger = MemoryLogger()
    trainer = make_trainer(max_epochs=max_epochs, callbacks=[refit, *callbacks], logger=logger, **(trainer_kw or {}))
    trainer.fit(model, train, val)
    return model, refit, trainer, logger


# ---------------------------------------------------------------------------------------------- against sklearn


def test_the_logged_number_equals_sklearn_ridge_classifier_on_the_same_rows():
    x_tr, y_tr = make_data(96, seed=0)
    x_va, y_va = make_data(48, seed=1)
    model, refit, trainer, logger = fit_refit(loader(x_tr, y_tr, shuffle=True), loader(x_va, y_va), max_epochs=2)
    accuracy, lam, scores = reference(embed(model, x_tr), y_tr, embed(model, x_va), y_va)
    assert 0.5 < accuracy < 0.95  # the classes overlap: the number says something
    metrics = trainer.callback_metrics
    assert metrics["eval/refit_top1"].item() == pytest.approx(accuracy)
    assert metrics["eval/refit_lambda"].item() == pytest.approx(lam)
    assert refit.last_fit.rows == 96  # the second epoch's rows only
    np.testing.assert_allclose(refit.last_fit.decision(embed(model, x_va)).numpy(), scores, rtol=1e-7, atol=1e-9)
    assert [row["eval/refit_lambda"] for row in logger.values("eval/refit_lambda")] == pytest.approx([lam, lam])
    assert trainer.test(model, loader(x_va, y_va))[0]["test/refit_top1"] == pytest.approx(accuracy)


@pytest.mark.parametrize("val_check_interval", [1.0, 0.5])
def test_each_validation_refits_on_the_rows_since_the_previous_one_of_a_moving_encoder(val_check_interval):
    x_tr, y_tr = make_data(96, seed=0)
    x_va, y_va = make_data(48, seed=1)
    model = make_module(optim={"type": "SGD", "lr": 0.2, "momentum": 0.9})  # the encoder moves every step
    windows = Windows()
    _, _, _, logger = fit_refit(
        loader(x_tr, y_tr, shuffle=True),
        loader(x_va, y_va),
        max_epochs=3,
        model=model,
        callbacks=[windows],
        trainer_kw={"val_check_interval": val_check_interval},
    )
    logged = logger.values("eval/refit_")
    assert len(logged) == len(windows.windows) == (3 if val_check_interval == 1.0 else 6)
    for (f_tr, y_win), evals, row in zip(windows.windows, windows.evals, logged):
        assert len(y_win) == 96 * val_check_interval
        f_va, y_eval = torch.cat([e[0] for e in evals]), torch.cat([e[1] for e in evals])
        accuracy, lam, _ = reference(f_tr, y_win, f_va, y_eval)
        assert row["eval/refit_top1"] == pytest.approx(accuracy)
        assert row["eval/refit_lambda"] == pytest.approx(lam)
    assert len({row["eval/refit_top1"] for row in logged}) > 1  # the encoder moved between validations


def test_validate_before_any_fit_logs_nothing_and_after_a_fit_repeats_the_last_number():
    x_tr, y_tr = make_data(48, seed=0)
    x_va, y_va = make_data(24, seed=1)
    model = make_module(optim=None)
    refit = RefitProbe(model, "refit", "embedding", "label", num_classes=NUM_CLASSES, eval_stats="train")
    trainer = make_trainer(callbacks=[refit])
    results = trainer.validate(model, loader(x_va, y_va))
    assert not [k for k in results[0] if "refit" in k]
    assert refit.last_fit is None and refit.statistics is None
    assert not [k for k in trainer.test(model, loader(x_va, y_va))[0] if "refit" in k]

    trainer = make_trainer(max_epochs=2, callbacks=[refit])
    trainer.fit(model, loader(x_tr, y_tr), loader(x_va, y_va))
    last = trainer.callback_metrics["eval/refit_top1"].item()
    accuracy, _, _ = reference(embed(model, x_tr), y_tr, embed(model, x_va), y_va)
    assert last == pytest.approx(accuracy)
    fit = refit.last_fit
    validated = trainer.validate(model, loader(x_va, y_va))[0]
    assert validated["eval/refit_top1"] == pytest.approx(last)
    assert refit.last_fit is fit  # no refit: there was no training row since the last validation
    assert trainer.test(model, loader(x_va, y_va))[0]["test/refit_top1"] == pytest.approx(last)


def test_validate_and_test_keep_the_last_fit_even_with_rows_after_the_last_validation():
    x_tr, y_tr = make_data(96, seed=0)
    x_va, y_va = make_data(24, seed=1)
    windows = Windows()
    # Validation after batches 5 and 10 of 12: the last two batches come after the last validation.
    model, refit, trainer, _ = fit_refit(
        loader(x_tr, y_tr), loader(x_va, y_va), callbacks=[windows], trainer_kw={"val_check_interval": 5}
    )
    assert len(windows.windows) == 2 and len(windows.rows) == 2
    last = trainer.callback_metrics["eval/refit_top1"].item()
    assert trainer.validate(model, loader(x_va, y_va))[0]["eval/refit_top1"] == pytest.approx(last)
    assert trainer.test(model, loader(x_va, y_va))[0]["test/refit_top1"] == pytest.approx(last)
    assert refit.last_fit.rows == 40


def test_test_after_a_fit_without_validation_fits_every_row_seen():
    x_tr, y_tr = make_data(48, seed=0)
    x_va, y_va = make_data(24, seed=1)
    model, refit, trainer, _ = fit_refit(loader(x_tr, y_tr), None, max_epochs=2)
    assert refit.last_fit is None
    result = trainer.test(model, loader(x_va, y_va))[0]
    f_tr = embed(model, x_tr)
    accuracy, _, _ = reference(torch.cat([f_tr, f_tr]), torch.cat([y_tr, y_tr]), embed(model, x_va), y_va)
    assert result["test/refit_top1"] == pytest.approx(accuracy)
    assert refit.last_fit.rows == 96  # both epochs: no validation started a new window
    assert "test/refit_lambda" not in result


def test_several_eval_loaders_get_one_number_each_and_one_lambda():
    x_tr, y_tr = make_data(96, seed=0)
    x_a, y_a = make_data(24, seed=1)
    x_b = make_data(24, seed=2)[0]
    y_b = torch.randperm(24, generator=torch.Generator().manual_seed(0)) % NUM_CLASSES  # unrelated to x
    loaders = [loader(x_a, y_a), loader(x_b, y_b)]
    metric = torchmetrics.classification.MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")
    model, _, trainer, _ = fit_refit(loader(x_tr, y_tr), loaders, metrics=metric)
    f_tr = embed(model, x_tr)
    expected = [reference(f_tr, y_tr, embed(model, x), y)[0] for x, y in ((x_a, y_a), (x_b, y_b))]
    assert expected[0] != expected[1]
    metrics = trainer.callback_metrics
    assert "eval/refit_top1" not in metrics and "eval/refit_lambda" in metrics
    for i, value in enumerate(expected):
        assert metrics[f"eval/refit_top1/dataloader_idx_{i}"].item() == pytest.approx(value)
        assert metrics[f"eval/refit_multiclass_accuracy/dataloader_idx_{i}"].item() == pytest.approx(value)
    tested = trainer.test(model, loaders)
    for i, value in enumerate(expected):
        assert tested[i][f"test/refit_top1/dataloader_idx_{i}"] == pytest.approx(value)


def test_metrics_in_the_split_form_receive_the_scores():
    x_tr, y_tr = make_data(48, seed=0)
    x_va, y_va = make_data(24, seed=1)
    seen = Collect()
    model, _, trainer, _ = fit_refit(loader(x_tr, y_tr), loader(x_va, y_va), metrics={"val": {"seen": seen}})
    _, _, scores = reference(embed(model, x_tr), y_tr, embed(model, x_va), y_va)
    got = torch.cat(model.callbacks_metrics["refit"]["validate"]["seen"].scores)
    np.testing.assert_allclose(got.numpy(), scores, rtol=1e-7, atol=1e-9)
    assert trainer.callback_metrics["eval/refit_seen"].item() == 24


class Collect(torchmetrics.Metric):
    """Keeps the scores it is given (outside its states) and logs their count."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")
        self.scores: list[torch.Tensor] = []

    def update(self, preds, target):
        self.scores.append(preds.clone())
        self.count += target.numel()

    def compute(self):
        return self.count.float()


# ---------------------------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8])
def test_ignored_labels_stay_out_and_narrow_labels_work(dtype):
    x_tr, y_tr = make_data(96, seed=0)
    x_va, y_va = make_data(48, seed=1)
    y_tr[::5] = -100
    y_tr[8:16] = -100  # a whole batch of unlabelled samples adds nothing
    y_va[::4] = -100  # left out of the metrics too
    model, refit, trainer, _ = fit_refit(loader(x_tr, y_tr.to(dtype)), loader(x_va, y_va.to(dtype)))
    accuracy, lam, _ = reference(embed(model, x_tr), y_tr, embed(model, x_va), y_va)
    assert refit.last_fit.rows == int((y_tr >= 0).sum())
    assert trainer.callback_metrics["eval/refit_top1"].item() == pytest.approx(accuracy)
    assert trainer.callback_metrics["eval/refit_lambda"].item() == pytest.approx(lam)


def test_uint8_labels_work():
    x_tr, y_tr = make_data(48, seed=0)
    x_va, y_va = make_data(24, seed=1)
    model, _, trainer, _ = fit_refit(loader(x_tr, y_tr.to(torch.uint8)), loader(x_va, y_va.to(torch.uint8)))
    accuracy, _, _ = reference(embed(model, x_tr), y_tr, embed(model, x_va), y_va)
    assert trainer.callback_metrics["eval/refit_top1"].item() == pytest.approx(accuracy)


def nan_forward(self, batch, stage):
    """Features that are NaN on the samples marked by x[:, 0] == 1000."""
    emb = self.backbone(batch["x"])
    return {"embedding": torch.where(batch["x"][:, :1] == 1000, torch.nan, emb)}


def test_non_finite_training_rows_stay_out_of_the_fit_and_are_warned_once():
    x_tr, y_tr = make_data(96, seed=0)
    x_va, y_va = make_data(48, seed=1)
    torch.manual_seed(0)
    model = Module(forward=nan_forward, backbone=nn.Sequential(nn.Linear(D_IN, D_EMB), nn.ReLU()))
    x_tr[[3, 20, 21, 50]] = 1000.0
    with pytest.warns(RuntimeWarning) as record:
        _, refit, trainer, _ = fit_refit(loader(x_tr, y_tr), loader(x_va, y_va), max_epochs=2, model=model)
    messages = [str(w.message) for w in record if "non-finite" in str(w.message)]
    assert messages == [
        "RefitProbe(name='refit'): 4 of 96 training rows since the previous validation had non-finite features "
        "(NaN/inf) and were left out of the fit (warned once per run). Check the model for a diverging loss or a "
        "precision overflow."
    ]
    f_tr = embed(model, x_tr)
    f_tr[[3, 20, 21, 50]] = torch.nan
    accuracy, lam, _ = reference(f_tr, y_tr, embed(model, x_va), y_va)
    assert refit.last_fit.rows == 92
    assert trainer.callback_metrics["eval/refit_top1"].item() == pytest.approx(accuracy)
    assert trainer.callback_metrics["eval/refit_lambda"].item() == pytest.approx(lam)


def test_non_finite_eval_samples_are_left_out_of_the_metrics_and_warned_once():
    x_tr, y_tr = make_data(96, seed=0)
    x_va, y_va = make_data(48, seed=1)
    torch.manual_seed(0)
    model = Module(forward=nan_forward, backbone=nn.Sequential(nn.Linear(D_IN, D_EMB), nn.ReLU()))
    x_va[[0, 9, 17]] = 1000.0
    with pytest.warns(RuntimeWarning) as record:
        _, _, trainer, _ = fit_refit(loader(x_tr, y_tr), loader(x_va, y_va), max_epochs=2, model=model)
    messages = [str(w.message) for w in record if "non-finite" in str(w.message)]
    assert messages == [
        "RefitProbe(name='refit'): 3 validation samples had non-finite features (NaN/inf) and were left out of "
        "eval/refit_* (warned once per run). Check the model for a diverging loss or a precision overflow."
    ]
    f_va = embed(model, x_va)
    f_va[[0, 9, 17]] = torch.nan
    accuracy, _, _ = reference(embed(model, x_tr), y_tr, f_va, y_va)
    assert trainer.callback_metrics["eval/refit_top1"].item() == pytest.approx(accuracy)


def test_a_window_of_only_ignored_labels_warns_and_keeps_the_previous_fit():
    x_tr, y_tr = make_data(48, seed=0)
    x_va, y_va = make_data(24, seed=1)
    model, refit, trainer, _ = fit_refit(loader(x_tr, y_tr), loader(x_va, y_va))
    fit, number = refit.last_fit, trainer.callback_metrics["eval/refit_top1"].item()
    trainer = make_trainer(max_epochs=1, callbacks=[refit])
    with pytest.warns(UserWarning, match=r"none of the 48 training rows .* was usable .*; the previous fit is"):
        trainer.fit(model, loader(x_tr, torch.full_like(y_tr, -100)), loader(x_va, y_va))
    assert refit.last_fit is fit
    assert trainer.callback_metrics["eval/refit_top1"].item() == pytest.approx(number)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (5, r"1 training labels since the previous validation lie outside \[0, 3\) for num_classes=3 \(this process "
         r"saw labels from 0 to 5\)\. Pass num_classes=6, or map the labels to 0\.\.2; mark samples to leave out "
         r"with -100\."),
        (-1, r"1 training labels .* \(this process saw labels from -1 to 2\)\. Map the labels to 0\.\.2"),
    ],
)  # fmt: skip
def test_a_training_label_out_of_range_is_a_clear_error_at_the_validation(bad, message):
    x_tr, y_tr = make_data(48, seed=0)
    y_tr[40] = bad
    y_tr[41] = -100  # still allowed
    with pytest.raises(RuntimeError, match=r"^RefitProbe\(name='refit'\): " + message):
        fit_refit(loader(x_tr, y_tr), loader(*make_data(24, seed=1)))


@pytest.mark.parametrize(
    ("target", "input", "message"),
    [
        (lambda out, b: b["label"].float(), "embedding", r"needs integer class labels, got torch\.float32"),
        ("label", lambda out, b: out["embedding"][:, None].repeat(1, 2, 1), r"have shape \(8, 2, 16\), .* HINT: pool"),
        (lambda out, b: b["label"][:4], "embedding", r"has 8 feature rows \('embedding'\) but 4 labels .*\(2 views"),
        ("label", lambda out, b: out["embedding"].bool(), r"are torch\.bool; the ridge classifier needs real"),
    ],
)
def test_bad_batches_are_clear_errors_at_the_first_batch(target, input, message):
    model = make_module(optim=None)
    refit = RefitProbe(model, "refit", input, target, num_classes=NUM_CLASSES, eval_stats="train")
    with pytest.raises(RuntimeError, match=r"^RefitProbe\(name='refit'\): .*" + message):
        make_trainer(callbacks=[refit]).fit(model, loader(*make_data(48, seed=0)))


def test_a_feature_size_that_changes_mid_run_is_a_clear_error():
    def forward(self, batch, stage):
        emb = self.backbone(batch["x"])
        return {"embedding": emb if self.global_step < 2 else emb[:, :8]}

    torch.manual_seed(0)
    model = Module(forward=forward, backbone=nn.Linear(D_IN, D_EMB))
    refit = RefitProbe(model, "refit", "embedding", "label", num_classes=NUM_CLASSES, eval_stats="train")
    with pytest.raises(RuntimeError, match=r"have 8 columns, but the training rows since the previous validation"):
        make_trainer(callbacks=[refit]).fit(model, loader(*make_data(48, seed=0)))


@pytest.mark.parametrize(
    ("kw", "error", "message"),
    [
        ({"name": None}, TypeError, r"^RefitProbe: name is required"),
        ({"input": None}, TypeError, r"input is required: where the input is, e\.g\. input='embedding'\."),
        ({"target": None}, TypeError, r"target is required: where the target is, e\.g\. target='label' or 1\."),
        ({"num_classes": None}, TypeError, r"num_classes is required: the number of classes, e\.g\. num_classes=10"),
        ({"num_classes": 1}, ValueError, r"num_classes must be an int >= 2, got 1: one class cannot be classified"),
        ({"num_classes": 2.0}, TypeError, r"num_classes must be an int >= 2, got 2\.0 \(float\)"),
        ({"num_classes": True}, TypeError, r"num_classes must be an int >= 2, got True \(bool\)"),
        ({"lambdas": []}, ValueError, r"lambdas must hold at least one value\. Pass None for the default grid\."),
        ({"lambdas": [1e-3, 0.0]}, ValueError, r"lambdas must be finite and > 0 \(penalties per row\), got 0\.0"),
        ({"lambdas": [float("inf")]}, ValueError, r"lambdas must be finite and > 0 \(penalties per row\), got inf"),
        ({"lambdas": "0.1"}, TypeError, r"lambdas must be a sequence of numbers > 0, got str\. Pass e\.g\."),
        ({"lambdas": 0.1}, TypeError, r"lambdas must be a sequence of numbers > 0, got float"),
        ({"lambdas": [0.1, "1"]}, TypeError, r"lambdas must be numbers > 0, got '1' \(str\)"),
        ({"metrics": {"lambda": torchmetrics.MeanMetric()}}, ValueError, r"a metric may not be named 'lambda'"),
        ({"metrics": "top1"}, TypeError, r"metrics must be a torchmetrics\.Metric, a list/tuple of them"),
        ({"module": "model"}, TypeError, r"module must be the LightningModule to probe"),
    ],
)
def test_bad_arguments_are_clear_errors_up_front(kw, error, message):
    model = make_module()
    args = {"module": model, "name": "refit", "input": "embedding", "target": "label", "num_classes": 3, **kw}
    prefix = "" if "name" in kw else r"^RefitProbe\(name='refit'\): "
    with pytest.raises(error, match=prefix + message):
        RefitProbe(**args)
    assert "refit" not in model.callbacks_metrics  # nothing stored before the checks


def test_lambdas_take_any_sequence_and_a_duplicate_name_is_an_error():
    model = make_module()
    refit = RefitProbe(
        model, "refit", "embedding", "label", num_classes=3, lambdas=torch.tensor([0.1, 1.0], dtype=torch.float64)
    )
    assert refit.lambdas == (0.1, 1.0)
    assert RefitProbe(None, "r", "embedding", "label", num_classes=3, lambdas=np.array([1e-2])).lambdas == (0.01,)
    with pytest.raises(ValueError, match=r"the name 'refit' is already used"):
        RefitProbe(model, "refit", "embedding", "label", num_classes=3)


# ---------------------------------------------------------------------------------------------- Lightning


def test_module_none_binds_at_setup_on_a_plain_lightning_module_with_tuple_batches():
    import lightning.pytorch as pl

    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.backbone = nn.Sequential(nn.Linear(D_IN, D_EMB), nn.ReLU())

        def training_step(self, batch, batch_idx):
            h = self.backbone(batch[0])
            return {"loss": h.sum() * 0, "h": h}

        def validation_step(self, batch, batch_idx):
            return {"h": self.backbone(batch[0])}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    x_tr, y_tr = make_data(48, seed=0)
    x_va, y_va = make_data(24, seed=1)
    tuples = [torch.utils.data.TensorDataset(x, y) for x, y in ((x_tr, y_tr), (x_va, y_va))]
    refit = RefitProbe(name="refit", input="h", target=1, num_classes=NUM_CLASSES, eval_stats="train")
    model = Plain()
    trainer = make_trainer(callbacks=[refit])
    trainer.fit(model, *(torch.utils.data.DataLoader(t, batch_size=8) for t in tuples))
    assert "refit" in model.callbacks_metrics
    accuracy, _, _ = reference(embed(model, x_tr), y_tr, embed(model, x_va), y_va)
    assert trainer.callback_metrics["eval/refit_top1"].item() == pytest.approx(accuracy)


def frozen_forward(self, batch, stage):
    with torch.inference_mode():  # a frozen backbone, run for its features only
        emb = self.backbone(batch["x"])
    out = {"embedding": emb}
    if stage == "fit":
        out["loss"] = self.head(emb.clone()).pow(2).mean()
    return out


def test_features_made_under_inference_mode_work_in_training_and_eval():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(D_IN, D_EMB), nn.ReLU())
    model = Module(forward=frozen_forward, backbone=backbone, head=nn.Linear(D_EMB, 1), optim="SGD")
    x_tr, y_tr = make_data(48, seed=0)
    x_va, y_va = make_data(24, seed=1)
    _, refit, trainer, _ = fit_refit(loader(x_tr, y_tr), loader(x_va, y_va), max_epochs=2, model=model)
    assert not refit.statistics.buffer.is_inference() and not refit.last_fit.weight.is_inference()
    accuracy, _, _ = reference(embed(model, x_tr), y_tr, embed(model, x_va), y_va)
    assert trainer.callback_metrics["eval/refit_top1"].item() == pytest.approx(accuracy)
    assert trainer.test(model, loader(x_va, y_va))[0]["test/refit_top1"] == pytest.approx(accuracy)
    # A second fit on the same probe, with two loaders (copies of the metrics made during an evaluation).
    trainer = make_trainer(callbacks=[refit])
    trainer.fit(model, loader(x_tr, y_tr), [loader(x_va, y_va), loader(x_va, y_va)])
    assert trainer.callback_metrics["eval/refit_top1/dataloader_idx_1"].item() == pytest.approx(accuracy)


class Spy(Callback):
    def on_sanity_check_end(self, trainer, pl_module):
        self.keys = [k for k in trainer.callback_metrics if "refit" in k]


def test_the_sanity_check_logs_nothing_even_with_a_previous_fit():
    x_tr, y_tr = make_data(48, seed=0)
    x_va, y_va = make_data(24, seed=1)
    model, refit, _, _ = fit_refit(loader(x_tr, y_tr), loader(x_va, y_va))
    fit = refit.last_fit
    spy = Spy()
    trainer = make_trainer(callbacks=[refit, spy], num_sanity_val_steps=2, limit_train_batches=2)
    trainer.fit(model, loader(x_tr, y_tr), loader(x_va, y_va))
    assert spy.keys == []
    assert refit.last_fit is not fit and refit.last_fit.rows == 16  # refitted on the 2 new batches


def test_predict_and_test_without_labels_need_no_target():
    x_tr, y_tr = make_data(48, seed=0)
    x_va, _ = make_data(16, seed=1)
    model, _, trainer, _ = fit_refit(loader(x_tr, y_tr), loader(*make_data(24, seed=1)))
    unlabelled = torch.utils.data.DataLoader([{"x": x_va[i]} for i in range(16)], batch_size=8)
    assert len(trainer.predict(model, unlabelled)) == 2
    with pytest.warns(UserWarning, match="the test batches hold no target 'label'; refit metrics are not logged"):
        results = trainer.test(model, unlabelled)
    assert not [k for k in results[0] if "refit" in k]


# ---------------------------------------------------------------------------------------------- checkpoints


def test_state_dict_is_plain_tensors_that_load_with_weights_only_and_round_trip(tmp_path):
    x_tr, y_tr = make_data(48, seed=0)
    _, refit, _, _ = fit_refit(loader(x_tr, y_tr), loader(*make_data(24, seed=1)))
    refit.accumulate(torch.randn(5, D_EMB), torch.tensor([0, 1, 2, -100, 1]))  # rows since the last fit
    state = refit.state_dict()
    torch.save(state, tmp_path / "refit.pt")
    loaded = torch.load(tmp_path / "refit.pt", weights_only=True)
    other = RefitProbe(make_module(), "refit", "embedding", "label", num_classes=NUM_CLASSES)
    other.load_state_dict(loaded)
    assert torch.equal(other.statistics.buffer, refit.statistics.buffer)
    assert torch.equal(other.statistics.shift, refit.statistics.shift)
    assert other.statistics.counts.tolist() == [4.0, 0.0, 0.0, 5.0]
    for key in ("weight", "bias", "gcv", "mean", "std"):
        assert torch.equal(getattr(other.last_fit, key), getattr(refit.last_fit, key)), key
    assert (other.last_fit.lambda_, other.last_fit.rows) == (refit.last_fit.lambda_, refit.last_fit.rows)
    again = other.state_dict()
    assert again.keys() == state.keys() and again["has_rows"] is True
    wrong = RefitProbe(make_module(), "refit", "embedding", "label", num_classes=4)
    with pytest.raises(RuntimeError, match=r"the checkpoint's probe was built with num_classes=3, this one with"):
        wrong.load_state_dict(loaded)


class ResumableBatches:
    """Prebuilt batches that resume where a checkpoint left them: Lightning saves and restores a loader's
    ``state_dict``, so a run resumed mid-epoch sees the same batches as an uninterrupted one."""

    def __init__(self, batches):
        self.batches, self._start, self._next = batches, 0, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        start, self._start = self._start, 0
        for i in range(start, len(self.batches)):
            self._next = i + 1
            yield self.batches[i]

    def state_dict(self):
        return {"next": self._next % len(self.batches)}  # after the last batch: the next epoch starts at 0

    def load_state_dict(self, state):
        self._start = state["next"]


class Stop(Exception):
    pass


class Interrupt(Callback):
    """Stops the run at the start of a step, as if the job were killed after the checkpoint of the step before."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Stop


def batches_of(x, y, batch_size=8):
    return [{"x": x[i : i + batch_size], "label": y[i : i + batch_size]} for i in range(0, len(x), batch_size)]


@pytest.mark.parametrize(
    ("stop_at", "saver"),
    [
        (4, {"every_n_train_steps": 4, "filename": "cut"}),  # mid-epoch 1: no validation yet
        (6, {"save_last": True}),  # the end of epoch 1, after its validation (ModelCheckpoint's default time)
        (9, {"every_n_train_steps": 9, "filename": "cut"}),  # mid-epoch 2: a fit and half a window
    ],
)
def test_a_resumed_run_refits_exactly_as_an_uninterrupted_one(tmp_path, stop_at, saver):
    x_tr, y_tr = make_data(48, seed=0)
    y_tr[::7] = -100
    x_va, y_va = make_data(24, seed=1)

    def run(callbacks=(), ckpt_path=None):
        model = make_module(optim={"type": "SGD", "lr": 0.2, "momentum": 0.9})  # a moving encoder
        refit = RefitProbe(model, "refit", "embedding", "label", num_classes=NUM_CLASSES, eval_stats="train")
        logger = MemoryLogger()
        trainer = make_trainer(
            max_epochs=3, callbacks=[refit, *callbacks], logger=logger, enable_checkpointing=bool(callbacks)
        )
        trainer.fit(model, ResumableBatches(batches_of(x_tr, y_tr)), loader(x_va, y_va), ckpt_path=ckpt_path)
        return refit, logger.values("eval/refit_")

    whole, logged = run()
    assert len(logged) == 3 and len({row["eval/refit_top1"] for row in logged}) > 1
    with pytest.raises(Stop):
        run([ModelCheckpoint(dirpath=tmp_path, **saver), Interrupt(stop_at)])
    path = tmp_path / ("last.ckpt" if "save_last" in saver else "cut.ckpt")
    resumed, resumed_logged = run(ckpt_path=str(path))
    assert resumed_logged == logged[stop_at // 6 :]  # the same numbers, to the last bit
    for key in ("weight", "bias", "gcv", "mean", "std"):
        assert torch.equal(getattr(resumed.last_fit, key), getattr(whole.last_fit, key)), key
    # Note: a checkpoint written at an epoch's last batch *before* its validation (every_n_train_steps=6 here) is
    # resumed by Lightning without that validation, for every callback; the rows of that epoch then join the next.


def test_validate_from_a_checkpoint_evaluates_the_last_fit(tmp_path):
    x_tr, y_tr = make_data(48, seed=0)
    x_va, y_va = make_data(24, seed=1)
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = make_module(optim=None)
    refit = RefitProbe(model, "refit", "embedding", "label", num_classes=NUM_CLASSES)
    trainer = make_trainer(max_epochs=2, callbacks=[refit, saver], enable_checkpointing=True)
    trainer.fit(model, loader(x_tr, y_tr), loader(x_va, y_va))
    last = trainer.callback_metrics["eval/refit_top1"].item()
    fresh = make_module(optim=None)
    again = RefitProbe(fresh, "refit", "embedding", "label", num_classes=NUM_CLASSES)
    results = make_trainer(callbacks=[again]).validate(fresh, loader(x_va, y_va), ckpt_path=tmp_path / "last.ckpt")
    assert results[0]["eval/refit_top1"] == pytest.approx(last)
    assert torch.equal(again.last_fit.weight, refit.last_fit.weight)


# ---------------------------------------------------------------------------------------------- evaluation statistics


def scored_with_own_statistics(fit, features: torch.Tensor) -> torch.Tensor:
    """The fit's scores of ``features`` standardised with their own exact statistics (float64, population std)."""
    f = features.double()
    std = f.std(0, unbiased=False)
    z = (f - f.mean(0)) / torch.where(std > 0, std, torch.ones_like(std))
    return z @ (fit.weight * fit.std[:, None]) + (fit.bias + fit.mean @ fit.weight)


class BatchNormEncoder(torch.nn.Module):
    """An encoder whose eval-mode features differ from its training-mode ones (BatchNorm's running statistics)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16, momentum=0.01))

    def forward(self, x):
        return self.net(x * 5 + 2) * 3 + 5


def test_by_default_evaluation_features_are_standardised_with_their_own_statistics():
    x_tr, y_tr = make_data(96, seed=0)
    x_va, y_va = make_data(48, seed=1)
    torch.manual_seed(0)
    model = Module(forward=lambda self, b, stage: {"embedding": self.backbone(b["x"])}, backbone=BatchNormEncoder())
    refit = RefitProbe(model, "refit", "embedding", "label", num_classes=NUM_CLASSES)
    trainer = make_trainer(max_epochs=1, callbacks=[refit])
    trainer.fit(model, loader(x_tr, y_tr), loader(x_va, y_va, batch_size=48))  # one validation batch
    model.eval()
    with torch.no_grad():
        f_va = model.backbone(x_va)
    expected = (scored_with_own_statistics(refit.last_fit, f_va).argmax(1) == y_va).double().mean().item()
    assert trainer.callback_metrics["eval/refit_top1"].item() == pytest.approx(expected)
    # eval_stats="train" scores the same eval-mode features with the fitted rows' statistics instead.
    plain = (refit.last_fit.decision(f_va).argmax(1) == y_va).double().mean().item()
    assert plain != expected
    train_stats = RefitProbe(None, "refit", "embedding", "label", num_classes=NUM_CLASSES, eval_stats="train")
    refit._eval_fit = None
    results = make_trainer(callbacks=[train_stats]).validate(model, loader(x_va, y_va, batch_size=48))
    assert not results[0]  # a new callback without a fit logs nothing: give it the fit, as a resume would
    train_stats._fit = refit.last_fit
    results = make_trainer(callbacks=[train_stats]).validate(model, loader(x_va, y_va, batch_size=48))
    assert results[0]["eval/refit_top1"] == pytest.approx(plain)


def test_a_second_loader_is_standardised_with_the_first_loaders_statistics():
    x_tr, y_tr = make_data(96, seed=0)
    x_va, y_va = make_data(48, seed=1)
    model = make_module(optim=None)
    refit = RefitProbe(model, "refit", "embedding", "label", num_classes=NUM_CLASSES)
    shifted = x_va * 2 + 3
    trainer = make_trainer(max_epochs=1, callbacks=[refit])
    trainer.fit(model, loader(x_tr, y_tr), [loader(x_va, y_va, batch_size=48), loader(shifted, y_va, batch_size=48)])
    with torch.no_grad():
        f_in, f_shift = embed(model, x_va), embed(model, shifted)
    f = f_in.double()
    std = f.std(0, unbiased=False)
    z = (f_shift.double() - f.mean(0)) / torch.where(std > 0, std, torch.ones_like(std))
    fit = refit.last_fit
    scores = z @ (fit.weight * fit.std[:, None]) + (fit.bias + fit.mean @ fit.weight)
    expected = (scores.argmax(1) == y_va).double().mean().item()
    assert trainer.callback_metrics["eval/refit_top1/dataloader_idx_1"].item() == pytest.approx(expected)
