"""The k-NN probe's pieces: nearest-neighbour vote, feature effective rank, BatchNorm re-estimation."""

import torch

from benchmarks.knn_probe import effective_rank, knn_accuracy, recompute_batchnorm


def test_effective_rank_counts_the_directions_features_spread_over():
    torch.manual_seed(0)
    on_a_line = torch.randn(200, 1) * torch.randn(1, 16)
    assert effective_rank(on_a_line) < 1.01
    # Equal spread over 4 orthogonal directions of a 16-d space: 4 equal singular values.
    four = torch.zeros(400, 16)
    for i in range(4):
        four[100 * i : 100 * (i + 1), i] = torch.tensor([1.0, -1.0]).repeat(50)
    assert abs(effective_rank(four) - 4.0) < 1e-3


def test_knn_accuracy_votes_with_the_nearest_train_features():
    train_x = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=1)
    train_y = torch.tensor([0, 0, 1, 1])
    val_x = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0]]), dim=1)
    assert knn_accuracy(train_x, train_y, val_x, torch.tensor([0, 1]), k=2, num_classes=2, temperature=0.07) == 100.0
    assert knn_accuracy(train_x, train_y, val_x, torch.tensor([1, 0]), k=2, num_classes=2, temperature=0.07) == 0.0


def test_recompute_batchnorm_sets_running_statistics_to_the_crops_and_leaves_eval_mode():
    torch.manual_seed(0)
    images = torch.rand(10, 3, 8, 8) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    crops = [(image, 0) for image in images]
    backbone = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    zero, one = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    # Two equal batches: the average of the batch means is the mean over all images.
    recompute_batchnorm(backbone, crops, zero, one, batch=5)
    norm = backbone[0]
    assert not backbone.training
    assert torch.allclose(norm.running_mean, images.mean((0, 2, 3)), atol=1e-5)
    # The average of per-batch variances: close to, not equal to, the variance over all images.
    assert torch.allclose(norm.running_var, images.var((0, 2, 3)), rtol=0.1)
