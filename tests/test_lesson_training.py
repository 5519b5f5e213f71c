"""core.lesson_training: a small network trained on the CPU in seconds shows HT-SR's claim with
the engine's own ESD and fit (a random MP start with alpha > 5, alpha falling into the heavy-tailed
band while test accuracy rises), reproducibly for a seed, and its knobs change the trajectory."""
import numpy as np
import pytest
import torch

from core.fit import fit_power_law
from core.lesson_training import TrainingSetup, train
from core.spectra import eigenvalues


@pytest.fixture(scope="module")
def good():
    return train(TrainingSetup())


def test_default_setting_moves_alpha_from_random_to_heavy_tailed(good):
    first, last = good.checkpoints[0], good.checkpoints[-1]
    assert first.step == 0 and last.step == good.setup.steps and not good.stopped
    assert first.alpha > 5, first.alpha                 # a random matrix: MP bulk, large alpha
    assert 2.0 < last.alpha < 4.0, last.alpha            # trained: heavy tail
    assert first.test_accuracy < 0.25 and last.test_accuracy > 0.55
    assert good.seconds < 30


def test_start_is_marchenko_pastur_and_training_pushes_eigenvalues_past_its_edge(good):
    edge = good.mp_edge0
    first, last = good.checkpoints[0].eigs, good.checkpoints[-1].eigs
    assert abs(first.max() / edge - 1) < 0.1             # the bulk of step 0 ends at λ+ (units of WᵀW)
    assert (last > 1.5 * edge).sum() >= 5                # after training: a tail past the edge


def test_alpha_is_the_engines_alpha_of_the_layer(good):
    cp = good.checkpoints[-1]
    assert cp.fit.alpha == fit_power_law(cp.eigs, xmin="full").alpha
    assert cp.eigs.size == good.setup.width and good.rows == good.cols == good.setup.width


def test_same_seed_same_run_another_seed_another():
    setup = TrainingSetup(steps=200, every=100)
    a, b = train(setup), train(setup)
    assert [c.step for c in a.checkpoints] == [0, 100, 200]
    assert all(np.array_equal(x.eigs, y.eigs) for x, y in zip(a.checkpoints, b.checkpoints))
    assert np.array_equal(a.accuracies, b.accuracies)
    c = train(TrainingSetup(steps=200, every=100, seed=1))
    assert not np.array_equal(a.checkpoints[-1].eigs, c.checkpoints[-1].eigs)


def test_label_noise_slows_the_fall_and_costs_accuracy(good):
    noisy = train(TrainingSetup(label_noise=0.5))
    assert np.array_equal(noisy.checkpoints[0].eigs, good.checkpoints[0].eigs)   # same start
    middle = len(good.checkpoints) // 4
    assert noisy.alphas[middle] > good.alphas[middle] + 0.5
    assert noisy.accuracies[-1] < good.accuracies[-1] - 0.15


def test_too_large_learning_rate_overshoots_below_two_and_costs_accuracy(good):
    hot = train(TrainingSetup(lr=0.5))
    assert hot.alphas[-1] < 2.2 and hot.alphas[-1] < good.alphas[-1] - 0.4
    assert hot.accuracies[-1] < good.accuracies[-1] - 0.05


def test_progress_and_checkpoint_callbacks_see_every_measurement():
    calls, seen = [], []
    result = train(TrainingSetup(steps=250, every=100), progress=lambda d, t, m: calls.append((d, t, m)),
                   on_checkpoint=seen.append)
    assert [d for d, _, _ in calls] == [0, 100, 200, 250] and all(t == 250 for _, t, _ in calls)
    assert "alpha" in calls[-1][2] and seen == result.checkpoints


def test_a_diverging_run_stops_and_says_why():
    result = train(TrainingSetup(lr=1e4, steps=200, every=50))
    assert "learning rate" in result.stopped and result.checkpoints[-1].step < 200
    assert all(np.isfinite(c.eigs).all() for c in result.checkpoints)


@pytest.mark.parametrize("kwargs, name", [(dict(lr=0.0), "lr"), (dict(lr=float("nan")), "lr"),
                                          (dict(label_noise=1.5), "label_noise"), (dict(batch=5000), "batch"),
                                          (dict(steps=0), "steps"), (dict(xmin="best"), "xmin")])
def test_impossible_settings_are_refused_by_name(kwargs, name):
    threads = torch.get_num_threads()
    with pytest.raises(ValueError, match=f"^{name}="):
        train(TrainingSetup(**kwargs))
    assert torch.get_num_threads() == threads


def test_thread_settings_are_restored_after_training():
    threads = torch.get_num_threads()
    train(TrainingSetup(steps=10, every=10))
    assert torch.get_num_threads() == threads
    eigenvalues(np.eye(3))                               # the engine still works afterwards
