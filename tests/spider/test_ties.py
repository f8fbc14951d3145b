"""The tie-aware comparison that distributed and integration tests rely on must catch real
differences, not only excuse them."""

import torch
from ties import TIE_EPS, spider_tie_flips, tie_flips


def test_a_flip_at_the_tie_is_excused_once_and_remembered():
    w_ref = [torch.tensor([1.0, 0.0, 0.7]), torch.tensor([1.0, 0.0, 0.7])]
    w_other = [torch.tensor([1.0, 0.9, 0.7]), torch.tensor([1.0, 0.9, 0.7])]
    # entry 1 sat at the tie at step 0; by step 1 the runs have drifted apart there
    gaps = [torch.tensor([0.3, TIE_EPS / 10, 0.2]), torch.tensor([0.3, 0.4, 0.2])]
    flips = tie_flips(w_ref, w_other, gaps)
    assert flips.far_from_tie == []
    assert flips.per_step == [1, 1]
    assert flips.ever.tolist() == [False, True, False]


def test_a_flip_away_from_the_tie_is_reported():
    gaps = [torch.tensor([0.3, 0.05, 0.2])]
    flips = tie_flips([torch.tensor([1.0, 0.0, 0.7])], [torch.tensor([1.0, 0.9, 0.7])], gaps)
    assert len(flips.far_from_tie) == 1 and "5.00e-02" in flips.far_from_tie[0]


def test_rounding_noise_in_S_flips_only_entries_at_the_tie_and_a_wrong_S_is_caught():
    gen = torch.Generator().manual_seed(0)
    theta0 = {"w": torch.randn(256, 256, generator=gen)}
    grad_sum = torch.randn(256, 256, generator=gen) * 1e-3
    noisy = grad_sum * (1 + 1e-6 * torch.randn(256, 256, generator=gen))
    flips = spider_tie_flips(theta0, [{"w": grad_sum}], [{"w": noisy}])["w"]
    assert flips.far_from_tie == [] and flips.per_step[0] < 10
    # a gradient sum with one row replaced (a bug, not rounding) is caught
    wrong = grad_sum.clone()
    wrong[0] = torch.randn(256, generator=gen) * 1e-2
    flips = spider_tie_flips(theta0, [{"w": grad_sum}], [{"w": wrong}])["w"]
    assert flips.far_from_tie != [] and flips.per_step[0] > 10
