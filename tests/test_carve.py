"""Carving on hand-made statistics, and the domain-free clustering."""

import pytest
import torch

from readmoe.calibrate import Stats
from readmoe.carve import balanced_kmeans, cluster_sets, domain_sets
from readmoe.errors import UserError


def test_domain_sets_hand_made():
    # one layer, 6 neurons, keep half = 3 per domain
    mean = torch.tensor([[[9, 8, 7, 0, 0, 0.]],     # domain a: {0,1,2}
                         [[9, 0, 8, 7, 0, 0.]],     # domain b: {0,2,3}
                         [[9, 0, 7, 0, 0, 8.]]])    # domain c: {0,2,5}
    shared, experts = domain_sets(mean, 0.5)
    assert shared[0].tolist() == [0, 2]
    assert [e.tolist() for e in experts[0]] == [[1], [3], [5]]


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.5])
def test_keep_out_of_range(keep):
    with pytest.raises(UserError, match="`keep`"):
        domain_sets(torch.rand(2, 1, 8), keep)


def test_balanced_kmeans_recovers_planted_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=1)
    x = torch.cat([centres[c] + 0.05 * torch.randn(10, 16, generator=g) for c in range(3)])
    a = balanced_kmeans(torch.nn.functional.normalize(x, dim=1), 3)
    assert sorted(torch.bincount(a).tolist()) == [10, 10, 10]
    for c in range(3):  # every planted group lands in one cluster
        assert len(set(a[c * 10:(c + 1) * 10].tolist())) == 1


def test_cluster_sets_partition_and_active_share():
    L, I, K = 2, 60, 4
    g = torch.Generator().manual_seed(0)
    st = Stats(["all"], torch.rand(1, L, I, generator=g), [100], torch.randn(L, I, 8, generator=g), torch.randn(8),
               "fp", {"complete": True})
    shared, experts = cluster_sets(st, K, keep=0.5)
    for l in range(L):
        every = torch.cat([shared[l], *experts[l]])
        assert sorted(every.tolist()) == list(range(I))  # a partition of all neurons
        sizes = [len(e) for e in experts[l]]
        assert max(sizes) - min(sizes) <= 1
        active = (len(shared[l]) + sum(sizes) / K) / I
        assert abs(active - 0.5) < 0.02
    with pytest.raises(UserError, match="below 1/`experts`"):
        cluster_sets(st, K, keep=0.1)
