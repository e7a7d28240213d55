"""Uneven batch splits (training/batch_split.py, ds_config.batch_split / loss_weight): each rank's slice of a global
batch worked by hand, the data position the same on any worker count, and on a tiny model the gradient DeepSpeed
would apply (each rank's backward divided by accum, the ranks averaged) equal to one worker's on the whole batch."""
import random

import pytest
import torch

from training import batch_split, ds_config
from training.losses import dpo_loss, total_loss


def rows(n: int, widths=None) -> list[dict]:
    widths = widths or [1] * n
    return [{"i": i, "prompt_ids": [0] * widths[i], "chosen_ids": [0], "rejected_ids": [0]} for i in range(n)]


def ids(micro_batches) -> list[tuple[list[int], int]]:
    return [([r["i"] for r in batch], pairs) for batch, pairs in micro_batches]


def test_32_pairs_over_6_ranks_by_hand():
    batch, shares = rows(32), ds_config.batch_split(32, 6)  # 6, 6, 5, 5, 5, 5; micro 3 x accum 2
    cut = [ids(batch_split.rank_micro_batches(batch, shares=shares, rank=r, micro_batch=3, accum=2, by_width=False))
           for r in range(6)]
    assert cut[0] == [([0, 1, 2], 3), ([3, 4, 5], 3)]
    assert cut[1] == [([6, 7, 8], 3), ([9, 10, 11], 3)]
    assert cut[2] == [([12, 13, 14], 3), ([15, 16], 2)]
    assert cut[5] == [([27, 28, 29], 3), ([30, 31], 2)]
    every = sorted(i for rank in cut for batch, _ in rank for i in batch)
    assert every == list(range(32))  # each pair once, none left out


def test_a_light_rank_pads_an_empty_micro_step_with_a_zero_weight_pair():
    batch, shares = rows(21), ds_config.batch_split(21, 2)  # 11 and 10; micro 1 x accum 11
    assert ds_config.batch_plan(21, 2) == (1, 11)
    light = ids(batch_split.rank_micro_batches(batch, shares=shares, rank=1, micro_batch=1, accum=11, by_width=False))
    assert light[:10] == [([i], 1) for i in range(11, 21)]
    assert light[10] == ([20], 0)  # its last pair again, counting 0 pairs: weight 0


def test_by_width_sorts_the_batch_before_cutting():
    batch = rows(4, widths=[9, 1, 5, 3])
    cut = [ids(batch_split.rank_micro_batches(batch, shares=(2, 2), rank=r, micro_batch=2, accum=1, by_width=True))
           for r in (0, 1)]
    assert cut == [[([1, 3], 2)], [([2, 0], 2)]]  # widths 1, 3 | 5, 9


@pytest.mark.parametrize("group_by_length", [False, True])
def test_the_pairs_trained_by_a_step_do_not_depend_on_the_worker_count(group_by_length):
    data = rows(70, widths=[random.Random(i).randint(1, 30) for i in range(70)])

    def trained_until(step: int, workers: int) -> list[int]:
        batches = batch_split.global_batches(iter(data), global_batch_size=12, buffer_size=20,
                                             rng=random.Random(7), group_by_length=group_by_length)
        shares = ds_config.batch_split(12, workers)
        micro, accum = ds_config.batch_plan(12, workers)
        done = []
        for _, batch in zip(range(step), batches):
            for rank in range(workers):
                done += [i for b, n in ids(batch_split.rank_micro_batches(
                    batch, shares=shares, rank=rank, micro_batch=micro, accum=accum, by_width=group_by_length))
                    for i in b[:n]]
        return sorted(done)

    assert len(list(batch_split.global_batches(iter(data), global_batch_size=12, buffer_size=20,
                                               rng=random.Random(7), group_by_length=group_by_length))) == 5
    for step in (1, 3, 5):
        first = trained_until(step, 1)
        assert len(first) == len(set(first)) == 12 * step
        assert all(trained_until(step, w) == first for w in (2, 5, 7))  # 5 and 7 do not divide 12


def test_an_unshuffled_stream_keeps_its_order_and_drops_the_partial_batch():
    batches = list(batch_split.global_batches(iter(rows(10)), global_batch_size=4, buffer_size=100, rng=None,
                                              group_by_length=False))
    assert [[r["i"] for r in b] for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_weighted_uneven_ranks_give_the_whole_batch_gradient_on_a_tiny_model():
    """One worker on 32 pairs vs 6 ranks (6,6,5,5,5,5, micro 3 x accum 2): DeepSpeed divides each backward by
    accum and averages the ranks; with ds_config.loss_weight the step's gradient is the same."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1, bias=False)
    chosen_x, rejected_x = torch.randn(32, 5), torch.randn(32, 5)
    ref_chosen, ref_rejected = torch.randn(32), torch.randn(32)

    def loss_on(index: list[int]) -> torch.Tensor:
        losses, _, _ = dpo_loss(model(chosen_x[index]).squeeze(-1), model(rejected_x[index]).squeeze(-1),
                                ref_chosen[index], ref_rejected[index], loss_type="sigmoid", beta=0.1)
        return total_loss(losses)

    def gradient(loss: torch.Tensor) -> torch.Tensor:
        model.zero_grad()
        loss.backward()
        return model.weight.grad.clone()

    whole = gradient(loss_on(list(range(32))))
    workers, (micro, accum) = 6, ds_config.batch_plan(32, 6)
    shares = ds_config.batch_split(32, workers)

    def averaged(weighted: bool) -> torch.Tensor:
        total = torch.zeros_like(whole)
        batch = [{"i": i, "prompt_ids": [0], "chosen_ids": [0], "rejected_ids": [0]} for i in range(32)]
        for rank in range(workers):
            for part, pairs in batch_split.rank_micro_batches(batch, shares=shares, rank=rank, micro_batch=micro,
                                                              accum=accum, by_width=False):
                weight = ds_config.loss_weight(pairs, workers=workers, accum=accum, global_batch_size=32)
                total += gradient(loss_on([r["i"] for r in part]) * (weight if weighted else 1.0)) / accum
        return total / workers

    assert torch.allclose(averaged(weighted=True), whole, atol=1e-7)
    # unweighted, a light rank's pairs would weigh more than the others'
    assert not torch.allclose(averaged(weighted=False), whole, atol=1e-4)
