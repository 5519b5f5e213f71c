"""Watch a network learn: train a small MLP on a synthetic task and measure one layer's ESD.

The Learn page's lesson "watch a network learn" (HT-SR's central claim: training moves a
layer's ESD from the Marchenko-Pastur bulk of its random initialisation to a heavy tail,
alpha falls). Everything is measured with the engine the rest of the app uses: eigenvalues of
``W^T W`` (no 1/N, :func:`core.spectra.eigenvalues`) and :func:`core.fit.fit_power_law`.

The task (a teacher-student classification, small enough for a 2-core CPU in seconds):

- inputs: ``inputs``-dimensional Gaussians whose variances decay as ``1/k`` along the axes
  (a power-law covariance, like natural images), scaled to unit mean variance;
- labels: the argmax of a fixed random teacher ``inputs -> 32 (tanh) -> classes``;
  ``label_noise`` replaces that fraction of the *training* labels by a uniformly random
  class (the test labels stay clean);
- student: ``inputs -> width -> width -> classes`` (ReLU), PyTorch's default initialisation,
  plain SGD with minibatches of ``batch``. The measured layer is the ``width x width`` hidden
  matrix (512 x 512 by default: large enough that its random start fits alpha > 5 reliably).

Deterministic for a seed: the data, the teacher, the initialisation, the label noise and the
minibatch order each come from their own generator, so one knob changes one thing (the same
seed with label noise trains the same network on the same inputs). Training runs on one
thread (steady and fair on shared cores; the previous thread count is restored).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from .checks import choice, fail, fraction, whole
from .fit import XMIN_METHODS, PowerLawFit, fit_power_law
from .metrics import mp_bulk_edges
from .progress import Progress, check_cancel, report
from .spectra import eigenvalues

log = logging.getLogger(__name__)

TEACHER_HIDDEN = 32


@dataclass(frozen=True)
class TrainingSetup:
    """The knobs of one training run (defaults: the lesson's good setting)."""

    lr: float = 0.1              # SGD learning rate
    batch: int = 16              # minibatch size
    label_noise: float = 0.0     # fraction of training labels replaced by a random class
    steps: int = 1200            # SGD steps
    every: int = 100             # measure the layer every this many steps (and at 0 and the end)
    width: int = 512             # hidden width: the measured matrix is width x width
    inputs: int = 64
    classes: int = 10
    n_train: int = 2000
    n_test: int = 2000
    seed: int = 0
    xmin: str = "full"           # the power-law fit's xmin method (KS distance, WeightWatcher's)

    def check(self) -> None:
        """Refuse impossible settings (one line naming the setting) before any work."""
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (0 < self.lr < math.inf):
            fail("lr", self.lr, "give a positive learning rate, e.g. 0.1")
        fraction("label_noise", self.label_noise)
        for name, low in (("batch", 1), ("steps", 1), ("every", 1), ("width", 8), ("inputs", 2),
                          ("classes", 2), ("n_train", 2), ("n_test", 1), ("seed", 0)):
            whole(name, getattr(self, name), low)
        if self.batch > self.n_train:
            fail("batch", self.batch, f"give at most n_train={self.n_train}")
        choice("xmin", self.xmin, XMIN_METHODS)


@dataclass(frozen=True)
class Checkpoint:
    """The measured layer at one step."""

    step: int
    eigs: np.ndarray             # eigenvalues of W^T W (ascending)
    fit: PowerLawFit
    test_accuracy: float
    train_loss: float            # mean minibatch loss since the previous checkpoint (nan at step 0)

    @property
    def alpha(self) -> float:
        return self.fit.alpha


@dataclass(frozen=True)
class TrainingResult:
    setup: TrainingSetup
    checkpoints: list[Checkpoint]
    rows: int
    cols: int
    w_var0: float                # variance of the layer's entries at initialisation
    seconds: float
    stopped: str = ""            # why training stopped early ("" when it ran every step)
    layer: str = field(default="hidden layer 2")

    @property
    def mp_edge0(self) -> float:
        """lambda+ of the initial matrix's Marchenko-Pastur bulk (units of W^T W)."""
        return mp_bulk_edges(rows=self.rows, cols=self.cols, w_var=self.w_var0)[1]

    @property
    def steps(self) -> np.ndarray:
        return np.array([c.step for c in self.checkpoints])

    @property
    def alphas(self) -> np.ndarray:
        return np.array([c.alpha for c in self.checkpoints])

    @property
    def accuracies(self) -> np.ndarray:
        return np.array([c.test_accuracy for c in self.checkpoints])


def _task(setup: TrainingSetup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test) of the teacher task; only the label noise depends on
    ``label_noise`` (its own generator), the inputs and the clean labels on the seed alone."""
    g = torch.Generator().manual_seed(setup.seed)
    scales = torch.arange(1, setup.inputs + 1, dtype=torch.float32) ** -0.5
    scales *= setup.inputs ** 0.5 / scales.norm()
    w1 = torch.randn(setup.inputs, TEACHER_HIDDEN, generator=g) / setup.inputs ** 0.5
    w2 = torch.randn(TEACHER_HIDDEN, setup.classes, generator=g) / TEACHER_HIDDEN ** 0.5
    x_train = torch.randn(setup.n_train, setup.inputs, generator=g) * scales
    x_test = torch.randn(setup.n_test, setup.inputs, generator=g) * scales
    label = lambda x: (torch.tanh(2 * x @ w1) @ w2).argmax(dim=1)  # noqa: E731
    y_train, y_test = label(x_train), label(x_test)
    if setup.label_noise > 0:
        noisy = torch.Generator().manual_seed(setup.seed + 1)
        flip = torch.rand(setup.n_train, generator=noisy) < setup.label_noise
        y_train = torch.where(flip, torch.randint(0, setup.classes, (setup.n_train,), generator=noisy), y_train)
    return x_train, y_train, x_test, y_test


def _student(setup: TrainingSetup) -> torch.nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(setup.seed + 2)
        return torch.nn.Sequential(
            torch.nn.Linear(setup.inputs, setup.width), torch.nn.ReLU(),
            torch.nn.Linear(setup.width, setup.width), torch.nn.ReLU(),
            torch.nn.Linear(setup.width, setup.classes))


OnCheckpoint = Optional[Callable[[Checkpoint], None]]


def train(setup: TrainingSetup = TrainingSetup(), *, progress: Progress = None, on_checkpoint: OnCheckpoint = None,
          cancel: object = None) -> TrainingResult:
    """Train the student and measure its hidden ``width x width`` layer at steps 0, ``every``,
    2 ``every``, ... and the last step. ``progress(done, total, message)`` is called after each
    checkpoint (``done`` counts steps; the message names the step, alpha and test accuracy).
    A loss that turns non-finite (a learning rate far too large) stops training: the result
    keeps the checkpoints so far and says why in ``stopped``. ``on_checkpoint(checkpoint)``, if
    given, receives each checkpoint as it is measured (for a live plot)."""
    setup.check()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            return _train(setup, progress, on_checkpoint, cancel)
    finally:
        torch.set_num_threads(threads)


def _train(setup: TrainingSetup, progress: Progress, on_checkpoint: OnCheckpoint, cancel: object) -> TrainingResult:
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = _task(setup)
    net = _student(setup)
    layer = net[2].weight
    w0 = layer.detach().numpy().astype(np.float64)
    order = torch.Generator().manual_seed(setup.seed + 3)
    opt = torch.optim.SGD(net.parameters(), lr=setup.lr)
    checkpoints: list[Checkpoint] = []
    losses: list[float] = []
    stopped = ""

    def measure(step: int) -> None:
        w = layer.detach().numpy().astype(np.float64)
        eigs = eigenvalues(w)
        fit = fit_power_law(eigs, xmin=setup.xmin)
        with torch.no_grad():
            acc = float((net(x_test).argmax(dim=1) == y_test).float().mean())
        loss = float(np.mean(losses)) if losses else math.nan
        losses.clear()
        checkpoints.append(Checkpoint(step, eigs, fit, acc, loss))
        if on_checkpoint is not None:
            on_checkpoint(checkpoints[-1])
        report(progress, step, setup.steps,
               f"step {step}/{setup.steps}: alpha {fit.alpha:.2f}, test accuracy {acc:.1%}")

    measure(0)
    for step in range(1, setup.steps + 1):
        check_cancel(cancel, "training")
        idx = torch.randint(0, setup.n_train, (setup.batch,), generator=order)
        loss = torch.nn.functional.cross_entropy(net(x_train[idx]), y_train[idx])
        if not torch.isfinite(loss):
            stopped = (f"the loss became non-finite at step {step} (learning rate {setup.lr:g} too large): "
                       "training stopped")
            log.info(stopped)
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % setup.every == 0 or step == setup.steps:
            measure(step)
    return TrainingResult(setup, checkpoints, rows=int(w0.shape[0]), cols=int(w0.shape[1]),
                          w_var0=float(w0.var()), seconds=time.perf_counter() - start, stopped=stopped)
