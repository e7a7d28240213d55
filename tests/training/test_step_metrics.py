"""A step's metrics from its micro-batches (training/step_metrics.py), against numbers worked by hand."""
import pytest
import torch

from training.step_metrics import metrics_of, micro_part, step_record


def part(loss, chosen_r, rejected_r, chosen, rejected, real, computed, unique=None):
    t = torch.tensor
    return micro_part(t(loss), t(chosen_r), t(rejected_r), t(chosen), t(rejected), real_tokens=real,
                      computed_tokens=computed, unique_tokens=real if unique is None else unique)


def test_two_micro_batches_on_two_workers():
    # worker 0: micro-batches of 2 and 1 pairs; worker 1: one of 3 pairs
    # real tokens count each prompt twice, unique ones once: 30 real with 10 prompt tokens is 20 unique
    w0 = step_record([part(0.6, [0.2, -0.1], [0.0, 0.1], [-5.0, -7.0], [-6.0, -6.0], 30, 40, 20),
                      part(0.8, [0.3], [0.5], [-3.0], [-4.0], 10, 10, 8)])
    w1 = step_record([part(0.4, [0.1, 0.0, 0.4], [0.0, 0.2, 0.1], [-1.0, -2.0, -3.0], [-2.0, -2.0, -2.0], 20, 30,
                           12)])
    m = metrics_of([w0, w1], elapsed=2.0)
    assert m["pairs"] == 6
    # per pair: each micro-batch's mean loss weighs its pairs (2, 1 and 3), as one worker's mean over all 6 would
    assert m["loss"] == pytest.approx((0.6 * 2 + 0.8 * 1 + 0.4 * 3) / 6)
    # rewards over all 6 pairs: chosen 0.2 -0.1 0.3 0.1 0.0 0.4 (sum 0.9), rejected 0 0.1 0.5 0 0.2 0.1 (sum 0.9)
    assert m["rewards/chosen"] == pytest.approx(0.9 / 6) and m["rewards/rejected"] == pytest.approx(0.9 / 6)
    assert m["rewards/accuracies"] == pytest.approx(3 / 6)  # 0.2>0, 0.1>0, 0.4>0.1; the others are not
    assert m["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert m["logps/chosen"] == pytest.approx(-21.0 / 6) and m["logps/rejected"] == pytest.approx(-22.0 / 6)
    assert m["real_tokens"] == 60 and m["tokens_per_s"] == 30.0
    assert m["padding_waste"] == pytest.approx(80 / 60)
    assert m["padding_unique"] == pytest.approx(80 / 40)  # 20 + 8 + 12 unique tokens


def test_a_record_is_plain_numbers_on_the_host():
    record = step_record([part(0.5, [1.0], [0.0], [-1.0], [-2.0], 3, 4)])
    assert record == {"loss": [0.5], "chosen_rewards": [1.0], "rejected_rewards": [0.0], "chosen_logps": [-1.0],
                      "rejected_logps": [-2.0], "real_tokens": 3, "computed_tokens": 4, "unique_tokens": 3}


def test_no_pairs_gives_zeros_not_an_error():
    m = metrics_of([step_record([])], elapsed=1.0)
    assert m["pairs"] == 0 and m["loss"] == 0.0 and m["rewards/accuracies"] == 0.0


def test_a_micro_batch_leaves_its_numbers_on_the_device():
    """No host sync per micro-batch (issue 14): the loss and the metrics part of a micro-batch never read a value back
    (.item(), float(), .tolist(), .cpu(), a tensor in an `if`); step_record copies once per step."""
    import inspect

    from training.losses import dpo_loss, total_loss

    def refuse(*args, **kwargs):
        raise AssertionError("a host sync in the micro-batch path")

    chosen, rejected = torch.tensor([-5.0, -6.0], requires_grad=True), torch.tensor([-7.0, -5.5], requires_grad=True)
    with pytest.MonkeyPatch.context() as patch:
        for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__"):
            patch.setattr(torch.Tensor, name, refuse)
        losses, chosen_r, rejected_r = dpo_loss(chosen, rejected, torch.tensor([-5.5, -6.0]),
                                                torch.tensor([-6.5, -6.0]), loss_type="sigmoid", beta=0.1,
                                                chosen_lengths=torch.tensor([3, 4]),
                                                rejected_lengths=torch.tensor([2, 4]))
        loss = total_loss(losses, rpo_alpha=0.5, chosen_token_logps_sum=chosen, chosen_lengths=torch.tensor([3, 4]))
        counts = {name: 13 for name in inspect.signature(micro_part).parameters if name.endswith("_tokens")}
        parts = [micro_part(loss, chosen_r, rejected_r, chosen, rejected, **counts)]
    assert step_record(parts)["real_tokens"] == 13 and len(step_record(parts)["chosen_rewards"]) == 2
