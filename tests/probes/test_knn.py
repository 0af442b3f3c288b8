from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from sslprobe.probes.knn import knn_predict


def sklearn_knn(bank: torch.Tensor, labels: torch.Tensor, k: int, temperature: float, distance: str):
    """scikit-learn's kNN with the same neighbours and the same vote per neighbour as `knn_predict`."""
    if distance == "cosine":

        def weights(d):  # scikit-learn's cosine distance is 1 - cosine similarity
            return np.exp((1 - d) / temperature)
    else:

        def weights(d):
            return 1 / (d + temperature)

    reference = KNeighborsClassifier(n_neighbors=k, metric=distance, weights=weights, algorithm="brute")
    return reference.fit(bank.double().numpy(), labels.numpy())


def data(seed: int = 0, n: int = 60, d: int = 6, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g) * 1.5
    labels = torch.arange(n) % classes
    bank = centers[labels] + torch.randn(n, d, generator=g) + 0.5  # off the origin: the two distances disagree
    queries_labels = torch.arange(20) % classes
    queries = centers[queries_labels] + torch.randn(20, d, generator=g) + 0.5
    return bank, labels, queries, queries_labels


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize(("k", "chunk_size"), [(1, 1000), (5, 7), (9, 1000), (60, 16)])
def test_knn_predict_matches_sklearn(distance, k, chunk_size):
    bank, labels, queries, query_labels = data()
    got = knn_predict(queries, bank, labels, 4, k=k, temperature=0.1, chunk_size=chunk_size, distance=distance)
    reference = sklearn_knn(bank, labels, k, 0.1, distance)
    np.testing.assert_allclose(got.numpy(), reference.predict_proba(queries.double().numpy()), rtol=1e-4, atol=1e-6)
    assert got.argmax(1).tolist() == reference.predict(queries.double().numpy()).tolist()
    accuracy = (got.argmax(1) == query_labels).float().mean().item()
    assert accuracy == pytest.approx(reference.score(queries.double().numpy(), query_labels.numpy()))


def test_the_two_distances_pick_different_neighbours():
    # The euclidean rule is not the cosine one in disguise: raw features of different norms reorder the neighbours.
    bank = torch.tensor([[1.0, 0.0], [10.0, 1.0]])
    query = torch.tensor([[2.0, 0.1]])
    cosine = knn_predict(query, bank, torch.tensor([0, 1]), 2, k=1)
    euclidean = knn_predict(query, bank, torch.tensor([0, 1]), 2, k=1, distance="euclidean")
    assert cosine.tolist() == [[0.0, 1.0]] and euclidean.tolist() == [[1.0, 0.0]]


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_rows_with_negative_labels_or_nonfinite_features_never_vote(distance):
    bank, labels, queries, _ = data(seed=1)
    dirty_bank, dirty_labels = bank.clone(), labels.clone()
    dirty_labels[::3] = -100
    dirty_bank[1::7] = float("nan")
    dirty_bank[2::11, 0] = float("inf")
    clean = (dirty_labels >= 0) & torch.isfinite(dirty_bank).all(1)
    got = knn_predict(queries, dirty_bank, dirty_labels, 4, k=5, temperature=0.1, chunk_size=8, distance=distance)
    expected = knn_predict(queries, bank[clean], labels[clean], 4, k=5, temperature=0.1, distance=distance)
    torch.testing.assert_close(got, expected)


def test_fewer_usable_rows_than_k_vote_alone_and_none_gives_zeros():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    got = knn_predict(torch.tensor([[1.0, 0.2]]), bank, torch.tensor([1, -100, -100]), 3, k=3)
    assert got.tolist() == [[0.0, 1.0, 0.0]]
    none = knn_predict(torch.tensor([[1.0, 0.2]]), bank, torch.full((3,), -100), 3, k=3, distance="euclidean")
    assert none.tolist() == [[0.0, 0.0, 0.0]]


def test_a_small_temperature_keeps_the_scores_finite():
    bank, labels, queries, _ = data(seed=2)
    got = knn_predict(queries, bank, labels, 4, k=5, temperature=1e-3)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.sum(1), torch.ones(len(queries)))
    reference = sklearn_knn(bank, labels, 5, 1.0, "cosine")  # the same neighbours; the nearest one wins at T -> 0
    nearest = reference.kneighbors(queries.double().numpy(), n_neighbors=1, return_distance=False)[:, 0]
    assert got.argmax(1).tolist() == labels[nearest].tolist()


def test_unknown_distance_is_rejected():
    with pytest.raises(ValueError, match=r"knn_predict: distance must be one of 'cosine', 'euclidean', got 'l2'"):
        knn_predict(torch.ones(1, 2), torch.ones(3, 2), torch.zeros(3, dtype=torch.long), 1, distance="l2")
