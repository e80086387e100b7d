from hpalign.train.schedule import (
    BatchPlan,
    all_step_indices,
    epoch_permutation,
    micro_batches_for_step,
    total_steps,
)


def test_micro_batch_layouts_see_the_same_examples_per_step():
    one_by_four = BatchPlan(num_examples=10, micro_batch_size=1, accumulation=4, world_size=1)
    four_by_one = BatchPlan(num_examples=10, micro_batch_size=4, accumulation=1, world_size=1)
    for step in range(6):
        a = micro_batches_for_step(one_by_four, step, seed=3, rank=0)
        b = micro_batches_for_step(four_by_one, step, seed=3, rank=0)
        assert [len(mb) for mb in a] == [1, 1, 1, 1] and [len(mb) for mb in b] == [4]
        assert sum(a, []) == b[0]


def test_ranks_partition_the_global_batch():
    plan = BatchPlan(num_examples=16, micro_batch_size=2, accumulation=2, world_size=2)
    step_indices = all_step_indices(plan, 1, seed=0)
    rank0 = sum(micro_batches_for_step(plan, 1, seed=0, rank=0), [])
    rank1 = sum(micro_batches_for_step(plan, 1, seed=0, rank=1), [])
    assert rank0 + rank1 == step_indices
    assert len(set(step_indices)) == 8


def test_epoch_covers_every_example_and_wrap_is_counted():
    plan = BatchPlan(num_examples=10, micro_batch_size=4, accumulation=1, world_size=1)
    assert plan.steps_per_epoch == 3 and plan.num_wrapped_per_epoch == 2
    seen = [i for step in range(3) for i in all_step_indices(plan, step, seed=1)]
    assert set(seen) == set(range(10)) and len(seen) == 12
    # the next epoch is a different permutation
    assert all_step_indices(plan, 3, seed=1) != all_step_indices(plan, 0, seed=1)


def test_total_steps():
    plan = BatchPlan(num_examples=10, micro_batch_size=4, accumulation=1, world_size=1)
    assert total_steps(plan, num_train_epochs=2, max_steps=-1) == 6
    assert total_steps(plan, num_train_epochs=0.5, max_steps=-1) == 2
    assert total_steps(plan, num_train_epochs=2, max_steps=5) == 5


# Computed with the schedule as it was before the permutation was cached (a randperm per rank per
# step): resume and every stored benchmark order depend on it staying exactly this.
EXPECTED_GLOBAL_BATCHES = [[6, 0, 4, 1, 5, 8, 3, 7], [2, 9, 6, 0, 4, 1, 5, 8], [7, 4, 9, 2, 3, 6, 0, 8],
                           [5, 1, 7, 4, 9, 2, 3, 6], [3, 5, 8, 7, 4, 6, 1, 0], [2, 9, 3, 5, 8, 7, 4, 6]]
EXPECTED_RANK1 = [[[5, 8], [3, 7]], [[4, 1], [5, 8]], [[3, 6], [0, 8]], [[9, 2], [3, 6]], [[4, 6], [1, 0]],
                  [[8, 7], [4, 6]]]


def test_order_is_unchanged_from_the_uncached_schedule():
    plan = BatchPlan(num_examples=10, micro_batch_size=2, accumulation=2, world_size=2)
    assert [all_step_indices(plan, step, seed=7) for step in range(6)] == EXPECTED_GLOBAL_BATCHES
    assert [micro_batches_for_step(plan, step, seed=7, rank=1) for step in range(6)] == EXPECTED_RANK1
    assert epoch_permutation(10, seed=7, epoch=1) == [7, 4, 9, 2, 3, 6, 0, 8, 5, 1]


def test_permutation_is_drawn_once_per_epoch_not_per_rank_per_step(monkeypatch):
    import torch

    from hpalign.train import schedule

    calls = []
    real_randperm = torch.randperm
    monkeypatch.setattr(schedule.torch, "randperm", lambda *a, **k: calls.append(a) or real_randperm(*a, **k))
    schedule.epoch_order.cache_clear()
    plan = BatchPlan(num_examples=40, micro_batch_size=2, accumulation=2, world_size=4)  # 3 steps an epoch
    for step in range(2 * plan.steps_per_epoch):  # what the loop asks each step, on every rank
        all_step_indices(plan, step, seed=5)
        for rank in range(plan.world_size):
            micro_batches_for_step(plan, step, seed=5, rank=rank)
    assert len(calls) == 2  # one per epoch
    info = schedule.epoch_order.cache_info()
    assert (info.misses, info.hits) == (2, 2 * plan.steps_per_epoch * (1 + plan.world_size) - 2)
