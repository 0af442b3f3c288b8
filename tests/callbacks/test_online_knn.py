from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sslprobe.callbacks import OnlineKNN
from sslprobe.probes.knn import knn_predict
from tests.conftest import NUM_CLASSES, dict_loader, make_module, make_trainer, make_xy


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
