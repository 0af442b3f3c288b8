from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchmetrics

from sslprobe import Module
from sslprobe.callbacks import OnlineKNN
from sslprobe.probes.knn import knn_predict
from tests.conftest import NUM_CLASSES, DictDataset, dict_loader, make_module, make_trainer, make_xy
from tests.probes.test_knn import sklearn_knn


def brute_force(queries, bank, labels, num_classes, k, temperature):
    sims = F.normalize(queries, dim=1) @ F.normalize(bank, dim=1).T
    top = sims.topk(k, dim=1)
    votes = torch.zeros(len(queries), num_classes)
    for i in range(len(queries)):
        for s, j in zip(top.values[i], top.indices[i]):
            votes[i, labels[j]] += torch.exp(s / temperature)
    return votes / votes.sum(1, keepdim=True)


@pytest.mark.parametrize("chunk_size", [3, 7, 1000])
def test_chunked_knn_matches_brute_force(chunk_size):
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(50, 6, generator=g), torch.randn(9, 6, generator=g)
    labels = torch.randint(0, 4, (50,), generator=g)
    got = knn_predict(queries, bank, labels, 4, k=5, temperature=0.1, chunk_size=chunk_size)
    torch.testing.assert_close(got, brute_force(queries, bank, labels, 4, 5, 0.1))


def test_online_knn_equals_offline_knn_on_frozen_features():
    model = make_module(optim=None)
    knn = OnlineKNN(model, "knn", "embedding", "label", k=5, temperature=0.1)
    trainer = make_trainer(max_epochs=3, callbacks=[knn])
    trainer.fit(model, dict_loader(shuffle=True), dict_loader(n=24, seed=1))
    assert knn.bank_size == 48  # one epoch of samples, even after three epochs
    x_tr, y_tr = make_xy(48)
    x_va, y_va = make_xy(24, seed=1)
    with torch.no_grad():
        scores = brute_force(model.backbone(x_va), model.backbone(x_tr), y_tr, NUM_CLASSES, 5, 0.1)
    expected = (scores.argmax(1) == y_va).float().mean()
    assert trainer.callback_metrics["eval/knn_top1"].item() == pytest.approx(expected.item())
    results = trainer.test(model, dict_loader(n=24, seed=1))
    assert results[0]["test/knn_top1"] == pytest.approx(expected.item())


def test_ring_buffer_keeps_the_most_recent_rows():
    model = make_module()
    knn = OnlineKNN(model, "knn", "embedding", "label", queue_size=10)
    for i in range(4):
        knn._push(torch.full((4, 2), float(i)), torch.full((4,), i))
    _feats, labels = knn._recent()
    assert knn.bank_size == 10
    assert labels.tolist() == [1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    knn._push(torch.arange(24.0).view(12, 2), torch.arange(12))
    assert knn._recent()[1].tolist() == list(range(2, 12))


def test_errors():
    with pytest.raises(ValueError, match=r"OnlineKNN\(name='knn'\): k must be a positive int, got 0"):
        OnlineKNN(make_module(), "knn", "embedding", "label", k=0)
    with pytest.raises(ValueError, match=r"temperature must be > 0"):
        OnlineKNN(make_module(), "knn", "embedding", "label", temperature=0)
    model = make_module()
    knn = OnlineKNN(model, "knn", "embedding", lambda out, b: b["label"].float())
    with pytest.raises(RuntimeError, match=r"kNN needs integer class labels"):
        make_trainer(max_epochs=1, callbacks=[knn]).fit(model, dict_loader())


def test_test_without_labels_warns_and_logs_nothing():
    model = make_module(optim=None)
    knn = OnlineKNN(model, "knn", "embedding", "label", k=3)
    trainer = make_trainer(max_epochs=1, callbacks=[knn])
    trainer.fit(model, dict_loader())
    x, _ = make_xy(16)
    unlabeled = torch.utils.data.DataLoader([{"x": x[i]} for i in range(16)], batch_size=8)
    with pytest.warns(UserWarning, match="hold no target"):
        results = trainer.test(model, unlabeled)
    assert "test/knn_top1" not in results[0]


# ---------------------------------------------------------------------- against scikit-learn, on tricky inputs


def embed(model, x):
    with torch.no_grad():
        return model.backbone(x)


def loader(x, y, batch_size=8):
    return torch.utils.data.DataLoader(DictDataset(x, y), batch_size=batch_size)


def fit_knn(train, val, *, max_epochs=1, **kw):
    """A frozen backbone (optim=None) probed by OnlineKNN: the bank holds exactly what `embed` gives."""
    model = make_module(optim=None)
    knn = OnlineKNN(model, "knn", "embedding", "label", **{"k": 5, "temperature": 0.1, **kw})
    trainer = make_trainer(max_epochs=max_epochs, callbacks=[knn])
    trainer.fit(model, train, val)
    return model, knn, trainer


def split(n_val=24):
    """Training and validation samples of one distribution (``make_xy`` with another seed moves the classes)."""
    x, y = make_xy(48 + n_val)
    return x[:48].clone(), y[:48].clone(), x[48:].clone(), y[48:].clone()


def score(model, x_tr, y_tr, x_va, y_va, k=5, temperature=0.1, distance="cosine"):
    """scikit-learn's accuracy over the labelled rows with finite features (the rows OnlineKNN keeps)."""
    f_tr, f_va = embed(model, x_tr), embed(model, x_va)
    keep_tr = (y_tr >= 0) & torch.isfinite(f_tr).all(1)
    keep_va = (y_va >= 0) & torch.isfinite(f_va).all(1)
    reference = sklearn_knn(f_tr[keep_tr], y_tr[keep_tr], k, temperature, distance)
    return reference.score(f_va[keep_va].double().numpy(), y_va[keep_va].numpy())


@pytest.mark.parametrize("ignored", [-100, -1])
@pytest.mark.parametrize("num_classes", [None, NUM_CLASSES])
def test_negative_labels_stay_out_of_the_bank_and_the_metrics(ignored, num_classes):
    x_tr, y_tr, x_va, y_va = split()
    y_tr[8:16] = ignored  # a whole batch of unlabelled samples adds nothing
    y_tr[::5] = ignored
    y_va[::4] = ignored  # left out of the denominator too
    model, knn, trainer = fit_knn(loader(x_tr, y_tr), loader(x_va, y_va), max_epochs=2, num_classes=num_classes)
    assert knn.bank_size == int((y_tr >= 0).sum())  # one epoch of the labelled rows
    expected = score(model, x_tr, y_tr, x_va, y_va)
    assert trainer.callback_metrics["eval/knn_top1"].item() == pytest.approx(expected)
    assert trainer.test(model, loader(x_va, y_va))[0]["test/knn_top1"] == pytest.approx(expected)


def test_a_bank_with_only_ignored_labels_warns_and_logs_nothing():
    x_tr, _ = make_xy(48)
    with pytest.warns(UserWarning, match=r"OnlineKNN\(name='knn'\): the kNN bank holds no usable training row"):
        _, knn, trainer = fit_knn(loader(x_tr, torch.full((48,), -100)), dict_loader(n=24, seed=1))
    assert knn.bank_size == 0
    assert "eval/knn_top1" not in trainer.callback_metrics


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_narrow_integer_labels_work(dtype):
    x_tr, y_tr, x_va, y_va = split()
    model, knn, trainer = fit_knn(loader(x_tr, y_tr.to(dtype)), loader(x_va, y_va.to(dtype)))
    assert knn._labels.dtype == torch.long
    expected = score(model, x_tr, y_tr, x_va, y_va)
    assert trainer.callback_metrics["eval/knn_top1"].item() == pytest.approx(expected)


def test_nonfinite_training_rows_stay_out_of_the_bank_and_are_warned_once():
    x_tr, y_tr, x_va, y_va = split()
    x_tr[16:24] = float("nan")  # one batch of 8 rows, in each of the two epochs
    with pytest.warns(RuntimeWarning) as record:
        model, knn, trainer = fit_knn(loader(x_tr, y_tr), loader(x_va, y_va), max_epochs=2)
    messages = [str(w.message) for w in record if "non-finite" in str(w.message)]
    assert len(messages) == 1, messages  # once per fit
    assert messages[0].startswith("OnlineKNN(name='knn'): 8 of 48 training rows this epoch had non-finite features")
    assert knn.bank_size == 40
    expected = score(model, x_tr, y_tr, x_va, y_va)
    assert expected > 0.9
    assert trainer.callback_metrics["eval/knn_top1"].item() == pytest.approx(expected)


def test_nonfinite_eval_samples_are_left_out_of_the_metrics_and_warned_once():
    x_tr, y_tr, x_va, y_va = split()
    x_va[[0, 9, 17]] = float("inf")
    with pytest.warns(RuntimeWarning) as record:
        model, _, trainer = fit_knn(loader(x_tr, y_tr), loader(x_va, y_va), max_epochs=2)
    messages = [str(w.message) for w in record if "non-finite" in str(w.message)]
    assert messages == [
        "OnlineKNN(name='knn'): 3 validation samples had non-finite features (NaN/inf) and were left out of "
        "eval/knn_* (warned once per run). Check the model for a diverging loss or a precision overflow; the kNN "
        "numbers cover the finite rows only."
    ]
    expected = score(model, x_tr, y_tr, x_va, y_va)
    assert trainer.callback_metrics["eval/knn_top1"].item() == pytest.approx(expected)


def test_several_eval_loaders_get_one_number_each():
    x_tr, y_tr, x_a, y_a = split(48)
    x_a, y_a, x_b = x_a[:24], y_a[:24], x_a[24:]  # in-domain
    y_b = torch.randperm(24, generator=torch.Generator().manual_seed(0)) % NUM_CLASSES  # labels unrelated to x
    loaders = [loader(x_a, y_a), loader(x_b, y_b)]
    metric = torchmetrics.classification.MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")
    model, _, trainer = fit_knn(loader(x_tr, y_tr), loaders, max_epochs=2, metrics=metric)
    expected = [score(model, x_tr, y_tr, x_a, y_a), score(model, x_tr, y_tr, x_b, y_b)]
    assert expected[0] > 0.9 > 0.6 > expected[1]
    metrics = trainer.callback_metrics
    assert "eval/knn_top1" not in metrics
    for i, value in enumerate(expected):
        assert metrics[f"eval/knn_top1/dataloader_idx_{i}"].item() == pytest.approx(value)
        assert metrics[f"eval/knn_multiclass_accuracy/dataloader_idx_{i}"].item() == pytest.approx(value)
    validated = trainer.validate(model, loaders)
    tested = trainer.test(model, loaders)
    for i, value in enumerate(expected):
        assert validated[i][f"eval/knn_top1/dataloader_idx_{i}"] == pytest.approx(value)
        assert tested[i][f"test/knn_top1/dataloader_idx_{i}"] == pytest.approx(value)
        assert tested[i][f"test/knn_multiclass_accuracy/dataloader_idx_{i}"] == pytest.approx(value)
    # Back to one loader: the plain name again.
    assert trainer.test(model, loaders[1])[0]["test/knn_top1"] == pytest.approx(expected[1])


@pytest.mark.parametrize(
    ("kw", "source"),
    [
        ({"num_classes": 3}, r"num_classes=3"),
        (
            {"metrics": torchmetrics.classification.MulticlassAccuracy(num_classes=3)},
            r"the metric 'multiclass_accuracy' has num_classes=3",
        ),
    ],
)
def test_a_bank_label_beyond_num_classes_is_a_clear_error(kw, source):
    x_tr, y_tr = make_xy(48)
    y_tr[40] = 5
    y_tr[41] = -100  # still allowed
    message = (
        rf"OnlineKNN\(name='knn'\): the kNN bank holds the training label 5, but {source}, so labels must lie in "
        r"\[0, 3\)\. Pass num_classes=6"
    )
    with pytest.raises(RuntimeError, match=message):
        fit_knn(loader(x_tr, y_tr), dict_loader(n=24, seed=1), **kw)


class ScoreAtTarget(torchmetrics.Metric):
    """Mean vote score of the true class: indexes the scores by the target, so they must be wide enough."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")
        self.widths: list[int] = []

    def update(self, preds, target):
        self.widths.append(preds.shape[1])
        self.total += preds.gather(1, target[:, None]).sum()
        self.count += target.numel()

    def compute(self):
        return self.total / self.count


def test_score_width_comes_from_the_metrics_then_from_every_label_seen():
    x_tr, y_tr, x_va, y_va = split()  # the bank only ever sees classes 0..2
    wide = torchmetrics.classification.MulticlassAccuracy(num_classes=6, average="micro")
    model, _, trainer = fit_knn(loader(x_tr, y_tr), loader(x_va, y_va), metrics=wide)
    expected = score(model, x_tr, y_tr, x_va, y_va)
    assert trainer.callback_metrics["eval/knn_multiclass_accuracy"].item() == pytest.approx(expected)

    y_va[::6] = 4  # a class that no training sample has: scores widened with zero columns for it
    model, _, trainer = fit_knn(loader(x_tr, y_tr), loader(x_va, y_va), metrics={"at_target": ScoreAtTarget()})
    f_tr, f_va = embed(model, x_tr), embed(model, x_va)
    proba = sklearn_knn(f_tr, y_tr, 5, 0.1, "cosine").predict_proba(f_va.double().numpy())  # (24, 3)
    proba = np.concatenate([proba, np.zeros((24, 2))], axis=1)
    expected_at_target = proba[np.arange(24), y_va.numpy()].mean()
    assert trainer.callback_metrics["eval/knn_at_target"].item() == pytest.approx(expected_at_target, rel=1e-5)
    assert set(model.callbacks_metrics["knn"]["validate"]["at_target"].widths) == {5}
    expected_top1 = score(model, x_tr, y_tr, x_va, y_va)
    assert trainer.callback_metrics["eval/knn_top1"].item() == pytest.approx(expected_top1)


class Collect(torchmetrics.Metric):
    """Keeps the vote scores it is given (outside its states) and logs their count."""

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


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("k", [1, 5])
def test_both_distances_match_sklearn_kneighbors_classifier(distance, k):
    x_tr, y_tr, x_va, y_va = split()
    x_va = x_va * 0.5  # moves the queries relative to the bank: cosine and L2 neighbours differ
    model, _, trainer = fit_knn(
        loader(x_tr, y_tr), loader(x_va, y_va), k=k, temperature=0.5, distance=distance, metrics={"seen": Collect()}
    )
    f_tr, f_va = embed(model, x_tr), embed(model, x_va)
    reference = sklearn_knn(f_tr, y_tr, k, 0.5, distance)
    scores = torch.cat(model.callbacks_metrics["knn"]["validate"]["seen"].scores)  # (24, C)
    np.testing.assert_allclose(scores.numpy(), reference.predict_proba(f_va.double().numpy()), rtol=1e-4, atol=1e-6)
    assert scores.argmax(1).tolist() == reference.predict(f_va.double().numpy()).tolist()
    expected = reference.score(f_va.double().numpy(), y_va.numpy())
    assert trainer.callback_metrics["eval/knn_top1"].item() == pytest.approx(expected)


def test_the_distances_give_different_numbers_on_the_same_bank():
    x_tr, y_tr, x_va, y_va = split()
    model, _, _ = fit_knn(loader(x_tr, y_tr), loader(x_va, y_va))
    f_tr, f_va = embed(model, x_tr), embed(model, x_va * 0.5)
    cosine = sklearn_knn(f_tr, y_tr, 5, 0.5, "cosine").predict_proba(f_va.double().numpy())
    euclidean = sklearn_knn(f_tr, y_tr, 5, 0.5, "euclidean").predict_proba(f_va.double().numpy())
    assert not np.allclose(cosine, euclidean)  # so the test above tells the two rules apart


@pytest.mark.parametrize(
    ("kw", "error", "message"),
    [
        ({"temperature": "0.1"}, TypeError, r"temperature must be a number > 0, got '0\.1' \(str\)\. Pass a float"),
        ({"temperature": None}, TypeError, r"temperature must be a number > 0, got None \(NoneType\)"),
        ({"temperature": float("nan")}, ValueError, r"temperature must be > 0 and finite, got nan\. Pass e\.g\."),
        ({"temperature": float("inf")}, ValueError, r"temperature must be > 0 and finite, got inf"),
        ({"temperature": -0.1}, ValueError, r"temperature must be > 0 and finite, got -0\.1"),
        ({"k": 0}, ValueError, r"k must be a positive int, got 0\. Pass e\.g\. k=20\."),
        ({"k": 2.5}, TypeError, r"k must be a positive int, got 2\.5 \(float\)"),
        ({"queue_size": 0}, ValueError, r"queue_size must be a positive int, got 0"),
        ({"num_classes": 0}, ValueError, r"num_classes must be a positive int or None, got 0"),
        (
            {"distance": "l2"},
            ValueError,
            r"distance must be one of 'cosine', 'euclidean', got 'l2'\. Pass distance='euclidean' for the L2",
        ),
    ],
)
def test_bad_arguments_are_clear_errors_up_front(kw, error, message):
    model = make_module()
    with pytest.raises(error, match=r"^OnlineKNN\(name='knn'\): " + message):
        OnlineKNN(model, "knn", "embedding", "label", **kw)
    assert "knn" not in model.callbacks_metrics  # nothing stored before the checks


def frozen_forward(self, batch, stage):
    with torch.inference_mode():  # a frozen backbone, run for its features only
        emb = self.backbone(batch["x"])
    out = {"embedding": emb}
    if stage == "fit":
        out["loss"] = self.head(emb.clone()).pow(2).mean()
    return out


def test_features_made_under_inference_mode_work_in_training_and_eval():
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
    model = Module(forward=frozen_forward, backbone=backbone, head=torch.nn.Linear(16, 1), optim="SGD")
    knn = OnlineKNN(model, "knn", "embedding", "label", k=5, temperature=0.1)
    trainer = make_trainer(max_epochs=2, callbacks=[knn])
    x_tr, y_tr, x_va, y_va = split()
    trainer.fit(model, loader(x_tr, y_tr), loader(x_va, y_va))
    assert knn._features is not None and not knn._features.is_inference()
    expected = score(model, x_tr, y_tr, x_va, y_va)
    assert trainer.callback_metrics["eval/knn_top1"].item() == pytest.approx(expected)
    assert trainer.test(model, loader(x_va, y_va))[0]["test/knn_top1"] == pytest.approx(expected)
    # A second fit on the same bank, whose per-loader metric copies are made during an inference-mode evaluation.
    trainer = make_trainer(max_epochs=1, callbacks=[knn])
    trainer.fit(model, loader(x_tr, y_tr), [loader(x_va, y_va), loader(x_va, y_va)])
    assert trainer.callback_metrics["eval/knn_top1/dataloader_idx_1"].item() == pytest.approx(expected)


def test_ring_buffer_compacts_usable_rows_on_the_device():
    knn = OnlineKNN(make_module(), "knn", "embedding", "label", queue_size=10)
    reference: list[int] = []  # labels of the rows that should have entered the bank, in order
    g = torch.Generator().manual_seed(0)
    for step, n in enumerate([4, 7, 0, 3, 12, 5, 9]):
        labels = torch.arange(step * 100, step * 100 + n)
        labels[torch.rand(n, generator=g) < 0.3] = -100
        features = labels[:, None].float().repeat(1, 2)
        features[torch.rand(n, generator=g) < 0.2, 1] = float("nan")
        usable = (labels >= 0) & torch.isfinite(features).all(1)
        reference += labels[-10:][usable[-10:]].tolist()  # a batch larger than the bank: its newest 10 rows
        knn._push(features, labels)
        feats, kept = knn._recent()
        assert kept.tolist() == reference[-10:]
        assert feats[:, 0].tolist() == [float(v) for v in reference[-10:]]
        assert torch.isfinite(feats).all()
    knn._push(torch.zeros(4, 2), torch.full((4,), -100))  # a batch of ignored labels adds nothing
    assert knn._recent()[1].tolist() == reference[-10:]
    assert knn.bank_size == 10


def test_state_dict_holds_plain_counters_and_round_trips(tmp_path):
    x_tr, y_tr = make_xy(48)
    y_tr[::4] = -100
    _, knn, _ = fit_knn(loader(x_tr, y_tr), dict_loader(n=24, seed=1), max_epochs=2)
    state = knn.state_dict()
    assert state == {"seen_this_epoch": 36, "seen_last_epoch": 36}
    torch.save(state, tmp_path / "knn.pt")
    other = OnlineKNN(make_module(), "knn", "embedding", "label")
    other.load_state_dict(torch.load(tmp_path / "knn.pt", weights_only=True))
    assert other.state_dict() == state


def test_a_16_bit_bank_holds_16_bit_features_at_half_the_memory_and_the_same_votes():
    from sslprobe import Module
    from tests.conftest import dict_loader, make_trainer

    def bf16_forward(self, batch, stage):
        return {"embedding": self.backbone(batch["x"]).to(torch.bfloat16)}  # as under bf16-mixed

    results = {}
    for dtype in (None, torch.float32):
        torch.manual_seed(0)
        model = Module(forward=bf16_forward, backbone=torch.nn.Linear(8, 16))
        knn = OnlineKNN(model, "knn", "embedding", "label", k=5, bank_dtype=dtype)
        trainer = make_trainer(max_epochs=1, callbacks=[knn])
        trainer.fit(model, dict_loader(), dict_loader())
        results[dtype] = (
            knn._features.dtype,
            knn._features.element_size(),
            float(trainer.callback_metrics["eval/knn_top1"]),
        )
    assert results[None][:2] == (torch.bfloat16, 2) and results[torch.float32][:2] == (torch.float32, 4)
    assert results[None][2] == results[torch.float32][2]  # bf16 values stored in bf16 lose nothing


def test_bank_dtype_must_be_a_floating_dtype():
    from sslprobe import Module

    model = Module(forward=lambda self, b, stage: {"h": self.net(b[0])}, net=torch.nn.Linear(4, 8))
    with pytest.raises(TypeError, match=r"bank_dtype must be a floating torch.dtype.*bank_dtype=torch.float32"):
        OnlineKNN(model, "knn", "h", 1, bank_dtype="bf16")
