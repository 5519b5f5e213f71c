"""Learn HT-SR: short interactive lessons on the same engine (spectra, fits, MP law, allocation,
training a small network). One lesson is shown and computed at a time; each lesson holds its own
controls. One convention, as in the engine and on Spectra: the eigenvalues of WᵀW (no 1/N)."""
import numpy as np
import plotly.graph_objects as go
import streamlit as st
from threadpoolctl import threadpool_limits

from core.allocation import DEFAULT_R_MAX, allocate
from core.fit import fit_power_law
from core.lesson_training import TrainingSetup, train
from core.metrics import mp_bulk_edges
from core.profiles import load_profile
from core.spectra import eigenvalues
from dashboard.exports import export_format_control, show
from dashboard.figures import LAYOUT, esd_figure
from dashboard.learn_figures import phases_edge_figure, run_label, training_curves_figure, training_esd_figure
from dashboard.state import State, setup

# Session keys of this page that are not yet in ``State`` (they belong there): the lesson shown,
# the Spikes lesson's own noise variance, the Phases lesson's second step, lesson 5's S and epsilon.
LESSON, SPIKE_VAR, PHASE_REAL, L_S, L_EPS = "l_lesson", "l_spike_var", "l_phase_real", "l_S", "l_eps"
LESSONS = ["1 · Random matrix", "2 · Heavy tails", "3 · Spikes", "4 · Phases of training", "5 · alpha → sparsity",
           "6 · Watch a network learn"]
KEEP = {}      # widget values survive page switches and hidden lessons: their keys are in State (setup)

setup()
export_format_control()
ss = st.session_state
st.title("Learn HT-SR")
st.markdown("Heavy-Tailed Self-Regularization reads how well a layer is trained from the **spectrum** of its "
            "weight matrix $W$ ($N \\times M$, $N \\ge M$): the eigenvalues $\\lambda_i$ of $W^\\top W$, the "
            "squared singular values of $W$ (no $1/N$: the convention of Spectra and of the reference tools; "
            "alpha does not depend on it). Every number below comes from Spectrascope's engine.")
lesson = st.segmented_control("Lesson", LESSONS, key=LESSON, default=LESSONS[0], required=True,
                              label_visibility="collapsed", **KEEP)


# The lessons' matrices are small: one BLAS thread is fastest and steady. Multi-threaded on the 2 shared
# cores, one 800 x 400 eigendecomposition took 1.2 s (median; up to 13 s), on one thread 0.05 s.
ONE_THREAD = threadpool_limits.wrap(limits=1)


@st.cache_data(show_spinner=False, max_entries=64)
@ONE_THREAD
def lesson_eigs(kind: str, n: int, m: int, shape: float, seed: int) -> np.ndarray:
    """Eigenvalues of W^T W of a synthetic N x M matrix: "pareto" entries of tail index ``shape``;
    "gaussian" entries of variance 1; "spike": gaussian + ``shape`` * theta_c u v^T (unit u, v;
    theta_c = (NM)^1/4 is the detection threshold). Noise of variance sigma^2 is sigma times this
    W, the spike's threshold included: its eigenvalues are sigma^2 times these, so the variance
    sliders need no new decomposition."""
    rng = np.random.default_rng(seed)
    if kind == "pareto":   # symmetric Pareto entries: P(|w| > t) = t^-mu for t >= 1
        w = rng.pareto(shape, size=(n, m)) + 1.0
        w *= rng.choice([-1.0, 1.0], size=(n, m))
    else:
        w = rng.normal(size=(n, m))
        if kind == "spike":
            u, v = rng.normal(size=n), rng.normal(size=m)
            w += shape * (n * m) ** 0.25 * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v))
    return eigenvalues(w)


TAIL_SHARE = 0.1     # lesson 2 fits the largest 10% of the eigenvalues (a stated xmin, see ``fitted``)


@st.cache_data(show_spinner=False, max_entries=8)
@ONE_THREAD
def fitted(n: int, m: int, mu: float, seed: int):
    """The heavy-tails lesson's eigenvalues and the power-law fit of their largest ``TAIL_SHARE``.

    A stated xmin (the eigenvalue above which lie the largest 10%), not one chosen by KS distance:
    for 2 < μ < 4 the finite-size tail is a few eigenvalues past an MP-like bulk, and the KS scan
    jumps between the tail and the bulk's edge (μ = 3 gave 9.46, μ = 4 gave 5.00). With the same
    share of eigenvalues at every μ, alpha grows monotonically with μ: 1 + μ/2 below 2, a steep
    finite-size rise between 2 and 4, and a constant (the steep edge of an MP bulk) above 4.
    The engine's fit with ``xmin="mid"`` (the median) of the top 2k eigenvalues fits exactly the
    top k: its Hill estimate, KS distance and sigma."""
    eigs = lesson_eigs("pareto", n, m, mu, seed)
    k = max(int(round(TAIL_SHARE * eigs.size)), 5)
    return eigs, fit_power_law(eigs[-2 * k:], xmin="mid")


@st.cache_data(show_spinner=False, max_entries=4)
@ONE_THREAD
def phase_examples(seed: int, n: int = 500, m: int = 250) -> list[tuple[str, np.ndarray, float]]:
    """One synthetic matrix per phase of Martin & Mahoney: (title, eigenvalues of WᵀW, λ+), with
    λ+ the MP edge of a random matrix of the same shape and entry variance (its shuffled copy)."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(n, m))
    theta_c = (n * m) ** 0.25                   # detection threshold of a rank-one signal (sigma = 1)

    def signal(strengths) -> np.ndarray:
        u, _ = np.linalg.qr(rng.normal(size=(n, len(strengths))))
        v, _ = np.linalg.qr(rng.normal(size=(m, len(strengths))))
        return (u * np.asarray(strengths, dtype=np.float64)) @ v.T

    pareto = (rng.pareto(2.5, size=(n, m)) + 1.0) * rng.choice([-1.0, 1.0], size=(n, m))
    low_rank = rng.normal(size=(n, m // 5)) @ rng.normal(size=(m // 5, m)) / np.sqrt(m // 5)
    matrices = [
        ("1 · random-like: Marchenko-Pastur", noise),
        ("2 · bleeding-out: a few just past λ+", noise + signal(theta_c * np.array([1.2, 1.4, 1.7]))),
        ("3 · bulk + spikes: clear outliers", noise + signal(theta_c * np.array([3.0, 4.0, 6.0]))),
        ("4 · bulk-decay: no sharp edge", noise + signal(4 * theta_c * np.arange(1, 61) ** -0.7)),
        ("5 · heavy-tailed: power-law tail", pareto),
        ("6 · rank-collapse: mass near 0", low_rank + 1e-3 * noise),
    ]
    return [(title, eigenvalues(w), mp_bulk_edges(rows=n, cols=m, w_var=float(w.var()))[1]) for title, w in matrices]


def synthetic_row(n: int, m: int, var: float, fit=None) -> dict:
    row = {"rows": n, "cols": m, "w_var": var, "alpha": np.nan, "xmin": np.nan, "n_tail": 0}
    if fit is not None and fit.ok:
        row.update(alpha=fit.alpha, xmin=fit.xmin, n_tail=fit.n_tail)
    return row


def size_controls(*extra: tuple) -> tuple[int, int, int, list[float]]:
    """The matrix size and seed controls (shared by lessons 1-3) and a lesson's own sliders
    ``(label, low, high, step, key)`` in one row; returns N >= M, M, seed and the sliders' values."""
    cols = st.columns(3 + len(extra))
    cols[0].slider("N (rows)", 100, 2000, step=50, key=State.l_n)
    cols[1].slider("M (columns)", 50, 1000, step=50, key=State.l_m)
    cols[2].number_input("random seed", 0, 10_000, key=State.l_seed)
    values = []
    for col, (label, low, high, step, key) in zip(cols[3:], extra):
        kw = {} if key in ss else {"value": {SPIKE_VAR: 1.0}.get(key, low)}
        values.append(float(col.slider(label, low, high, step=step, key=key, **KEEP, **kw)))
    n, m = max(ss[State.l_n], ss[State.l_m]), min(ss[State.l_n], ss[State.l_m])
    if ss[State.l_n] < ss[State.l_m]:
        st.caption(f"Using the larger side as N: {n} x {m}.")
    return n, m, int(ss[State.l_seed]), values


def formula(*lines: str) -> None:
    """A displayed formula in short lines, one under the other: KaTeX does not wrap, and at 800 px
    with the sidebar open about 500 px are left (one long line was cut off there)."""
    st.latex(r"\begin{gathered}" + r" \\ ".join(lines) + r"\end{gathered}")


LEARNING_RATES = [0.02, 0.1, 0.3, 0.5]
BATCHES = [4, 16, 64]
LABEL_NOISES = [0.0, 0.25, 0.5]
STEPS = [300, 600, 1200, 2000]
MAX_RUNS = 4


def train_live(setup: TrainingSetup):
    """Train with a progress bar and a live plot of alpha and test accuracy, one point per checkpoint."""
    bar = st.progress(0.0, text="training: step 0")
    live = st.empty()
    seen = []

    def on_checkpoint(cp) -> None:
        seen.append((cp.step, cp.alpha, cp.test_accuracy))
        steps, alphas, accs = zip(*seen)
        fig = go.Figure([go.Scatter(x=steps, y=alphas, name="alpha", mode="lines+markers"),
                         go.Scatter(x=steps, y=accs, name="test accuracy", mode="lines+markers", yaxis="y2")])
        fig.update_layout(**{**LAYOUT, "height": 260}, title="so far", xaxis_title="training step",
                          yaxis_title="alpha", xaxis_range=[0, setup.steps],
                          yaxis2=dict(title="test accuracy", overlaying="y", side="right", range=[0, 1],
                                      tickformat=".0%"))
        live.plotly_chart(fig, key=f"l_t_live_{cp.step}")

    result = train(setup, progress=lambda done, total, msg: bar.progress(done / total, text=msg),
                   on_checkpoint=on_checkpoint)
    bar.empty()
    live.empty()
    return result


if lesson == LESSONS[0]:
    st.markdown("A matrix of i.i.d. entries with variance $\\sigma^2$ has no learned structure. The ESD of "
                "$W^\\top W$ follows the **Marchenko-Pastur** law (here for the eigenvalues of $W^\\top W$, "
                "without $1/N$; $N \\ge M$):")
    formula(r"\rho(\lambda) = \frac{\sqrt{(\lambda_+-\lambda)(\lambda-\lambda_-)}}{2\pi\sigma^2 M\,\lambda}",
            r"\lambda_\pm = \sigma^2\left(\sqrt{N} \pm \sqrt{M}\right)^2")
    N, M, seed, (var,) = size_controls(("variance σ²", 0.1, 4.0, 0.1, State.l_var))
    eigs = var * lesson_eigs("gaussian", N, M, 0.0, seed)
    lo, hi = mp_bulk_edges(rows=N, cols=M, w_var=var)
    fig = esd_figure([{"label": "gaussian W", "row": synthetic_row(N, M, var), "eigs": eigs}], linear=True,
                     show_fit=False, mp_name="MP law")
    show(fig, "lesson1_mp", model="", settings={"N": N, "M": M, "var": var, "seed": seed}, key="l_mp")
    st.caption(f"N/M = {N / M:.3g}; bulk edges: λ- = σ²(√N - √M)² = {lo:.4g}, λ+ = σ²(√N + √M)² = {hi:.4g}; "
               f"largest eigenvalue {eigs.max():.4g}. No eigenvalue leaves the bulk: nothing was learned.")

elif lesson == LESSONS[1]:
    st.markdown("Training correlates the weights. HT-SR models that with **heavy-tailed** entries: "
                "$P(|W_{ij}| > t) \\sim t^{-\\mu}$. The ESD's tail $\\rho(\\lambda) \\sim \\lambda^{-\\alpha}$ "
                "then depends on the **regime** of $\\mu$ (Martin & Mahoney, JMLR 2021, Table 1):")
    formula(r"0<\mu<2:\ \ \alpha = 1 + \mu/2\ \ \text{(very heavy-tailed)}",
            r"2<\mu<4:\ \ \alpha \approx a\mu + b\ \ \text{(weakly heavy-tailed)}",
            r"\mu>4:\ \ \text{Marchenko-Pastur again}")
    N, M, seed, (mu,) = size_controls(("tail index μ of the entries", 0.5, 5.0, 0.1, State.l_mu))
    eigs, fit = fitted(N, M, mu, seed)
    fig = esd_figure([{"label": f"μ={mu:g}", "row": synthetic_row(N, M, np.nan, fit), "eigs": eigs}],
                     show_mp=False)
    show(fig, "lesson2_heavy_tails", model="", settings={"N": N, "M": M, "mu": mu, "seed": seed}, key="l_ht")
    a, b, c = st.columns(3)
    a.metric("fitted alpha", f"{fit.alpha:.2f}" if fit.ok else "no fit",
             help="power-law fit (the engine's MLE) of the largest 10% of the eigenvalues")
    b.metric("theory 1 + μ/2", f"{1 + mu / 2:.2f}" if mu < 2 else "n/a (μ ≥ 2)")
    regime = "very heavy-tailed" if mu < 2 else "weakly heavy-tailed" if mu < 4 else "Marchenko-Pastur"
    c.metric("regime", regime)
    if mu >= 4:
        st.info(f"At μ = {mu:g} the entries have a finite fourth moment: the ESD is Marchenko-Pastur again, with "
                "a sharp edge and no power-law tail. The fit still returns a number (the steepness of the bulk's "
                "edge, the same for every μ > 4), but as a power law it means little.", icon=":material/info:")
    elif mu >= 2:
        st.caption("Weakly heavy-tailed regime (2 < μ < 4): an MP-like bulk plus a finite-size power-law tail of a "
                   "few large eigenvalues; alpha rises steeply with μ and depends on N and M, not only on μ.")
    st.caption(f"The fit uses a stated xmin: the eigenvalue above which lie the largest {TAIL_SHARE:.0%} "
               f"({fit.n_tail} of {M}; dotted line). Choosing xmin by KS distance, as Spectra does, jumps between "
               "the few tail eigenvalues and the bulk's edge once μ > 2 (μ = 3 gave 9.46, μ = 4 gave 5.00); with "
               "the same share at every μ, smaller μ always gives smaller alpha, across the three regimes. "
               "LLM layers typically show alpha between 2 and 6.")

elif lesson == LESSONS[2]:
    st.markdown("A learned feature can also appear as a **spike**: a rank-one signal $\\theta\\,u v^\\top$ "
                "(unit vectors) added to noise of variance $\\sigma^2$. It leaves the bulk only above the "
                "detection (BBP) threshold $\\theta_c$; above it ($\\theta > \\theta_c$) the largest eigenvalue of "
                "$W^\\top W$ is")
    formula(r"\theta_c = \sigma\,(NM)^{1/4}",
            r"\lambda_{\text{spike}} = \frac{(\theta^2 + \sigma^2 N)(\theta^2 + \sigma^2 M)}{\theta^2}")
    N, M, seed, (var, strength) = size_controls(("noise variance σ²", 0.1, 4.0, 0.1, SPIKE_VAR),
                                                 ("signal strength θ / θc", 0.0, 3.0, 0.05, State.l_spike))
    theta_c = np.sqrt(var) * (N * M) ** 0.25
    theta = strength * theta_c
    eigs = var * lesson_eigs("spike", N, M, strength, seed)
    hi = mp_bulk_edges(rows=N, cols=M, w_var=var)[1]
    top = float(eigs.max())
    fig = esd_figure([{"label": "noise + spike", "row": synthetic_row(N, M, var), "eigs": eigs}], linear=True,
                     show_fit=False, mp_name="MP law of the noise")
    fig.add_vline(x=top, line=dict(color="#E45756", width=2), annotation_text="largest λ")  # linear axis
    show(fig, "lesson3_spike", model="", settings={"N": N, "M": M, "var": var, "theta": f"{strength:g}thc"},
         key="l_spike_fig")
    predicted = (theta**2 + var * N) * (theta**2 + var * M) / theta**2 if theta > theta_c else hi
    a, b, c = st.columns(3)
    a.metric("largest eigenvalue", f"{top:.4g}")
    b.metric("prediction", f"{predicted:.4g}", help="the spike formula above θc, the bulk edge λ+ below it")
    c.metric("bulk edge λ+", f"{hi:.4g}")
    st.caption("Below θc the signal is invisible in the spectrum; above it one eigenvalue separates from the bulk.")

elif lesson == LESSONS[3]:
    st.markdown("Martin & Mahoney describe training as a path through six **phases**, read from the ESD: "
                "*random-like* → *bleeding-out* → *bulk + spikes* → *bulk-decay* → *heavy-tailed* → "
                "*rank-collapse*. **Step 1**: one synthetic 500 x 250 matrix per phase (log-log axes; dashed: "
                "λ+, the edge of the Marchenko-Pastur bulk of a random matrix with the same entry variance).")
    examples = phase_examples(int(ss[State.l_seed]))
    show(phases_edge_figure(examples), "lesson4_phases", model="", key="l_phases")
    st.caption("1: i.i.d. noise, nothing past λ+. 2: weak rank-one signals just above the threshold: a few "
               "eigenvalues just past λ+. 3: strong signals, far outliers. 4: sixty signals of decaying strength "
               "blur the edge into a tail. 5: heavy-tailed entries (μ = 2.5), a power-law tail. 6: a rank-50 "
               "matrix: most eigenvalues collapse towards 0.")
    st.markdown("**Step 2**: real layers of the loaded model, in the same units (eigenvalues of $W^\\top W$, "
                "log-log), with each layer's λ+.")
    analysis = ss[State.analysis]
    if analysis is None:
        st.info("Load a model on **Home / model** to see its own layers here.")
    else:
        t = analysis.table[analysis.table["alpha"].notna()].sort_values("alpha")
        if t.empty:
            st.info("No matrix of this model has a power-law fit.")
        elif st.toggle("Show three layers of the loaded model", key=PHASE_REAL, **KEEP):
            picks = [("most random-like", t.iloc[-1]), ("typical", t.iloc[len(t) // 2]),
                     ("most heavy-tailed", t.iloc[0])]
            # the figure adds "(α=...)" to each layer's legend entry
            items = [{"label": f"{what}: {r['block']}.{r['kind']}", "row": r.to_dict(),
                      "eigs": analysis.eigs[r["name"]]} for what, r in picks]
            fig = esd_figure(items, full_legend=False,
                             title=f"three layers of {analysis.model}: largest, median and smallest alpha")
            show(fig, "lesson4_layers", settings={"xmin": analysis.xmin}, key="l_layers")
            st.caption(" · ".join(f"`{r['name']}`: {r['num_spikes']:.0f} eigenvalues above λ+, {r['status']}"
                                  for _, r in picks) + ". Dashed: each layer's power-law fit from its xmin (dotted); "
                       "dash-dot: the MP law of its shuffled entries, long dashes: its λ+.")

elif lesson == LESSONS[4]:
    st.markdown("AlphaPruning turns each block's mean alpha $m_i$ into a sparsity: a linear map into "
                "$[1-\\varepsilon, 1+\\varepsilon]$, then a rescale so the parameter-weighted mean is the target "
                "$S$, with every ratio capped at $r_{\\max}$:")
    formula(r"q_i = (1-\varepsilon) + 2\varepsilon\,\frac{m_i - \min m}{\max m - \min m}",
            r"r_i = \min\!\Big(q_i\,\frac{S\sum_j n_j}{\sum_j n_j q_j},\ r_{\max}\Big)")
    a, b = st.columns(2)
    S = a.slider("target sparsity S", 0.1, 0.9, step=0.05, key=L_S, **KEEP, **({} if L_S in ss else {"value": 0.7}))
    eps = b.slider("ε", 0.0, 0.8, step=0.05, key=L_EPS, **KEEP, **({} if L_EPS in ss else {"value": 0.3}))
    analysis = ss[State.analysis]
    table = analysis.table if analysis is not None else load_profile("llama-7b-hf")
    source = analysis.model if analysis is not None else "published LLaMA-7B profile"
    try:
        alloc = allocate(table, sparsity=S, epsilon=eps, r_max=DEFAULT_R_MAX)
    except ValueError as exc:
        st.error(str(exc))
    else:
        r = alloc.ratios
        blocks = r.groupby("block").agg(metric=("metric", "mean"), ratio=("ratio", "mean"), capped=("clipped", "any"))
        fig = go.Figure(go.Scatter(
            x=blocks["metric"], y=blocks["ratio"], mode="markers", name="blocks",
            marker=dict(size=10, color=blocks.index, colorscale="Viridis", line=dict(width=1, color="white"),
                        symbol=np.where(blocks["capped"], "diamond", "circle"),
                        colorbar=dict(title=dict(text="block"), thickness=12)),
            customdata=np.stack([blocks.index, blocks["capped"].map({True: " (at r_max)", False: ""})], axis=1),
            hovertemplate="block %{customdata[0]}%{customdata[1]}<br>mean alpha %{x:.3f}<br>"
                          "sparsity %{y:.3f}<extra></extra>"))
        fig.add_hline(y=S, line=dict(dash="dash"), annotation_text="S")
        fig.add_hline(y=DEFAULT_R_MAX, line=dict(dash="dot", color="#E45756"), annotation_text=f"r_max {DEFAULT_R_MAX:g}",
                      annotation_position="bottom right")
        fig.update_layout(**{**LAYOUT, "height": 380}, title=f"block mean alpha → block sparsity ({source})",
                          xaxis_title="block mean alpha", yaxis_title="sparsity ratio", showlegend=False)
        show(fig, "lesson5_alloc", model=source, settings={"S": S, "eps": eps}, key="l_alloc")
        capped = [int(b) for b in blocks.index[blocks["capped"]]]
        st.caption("Larger alpha = less well trained = pruned more. Colour: block depth; hover a point for its "
                   f"block. No ratio may exceed r_max = {DEFAULT_R_MAX:g}: "
                   + (f"block{'s' if len(capped) > 1 else ''} {', '.join(map(str, capped))} reached it (diamonds) "
                      "and their excess went to the other blocks." if capped else "no block reaches it here."))

else:
    st.markdown("HT-SR's central claim, made visible: **training moves a layer's ESD from the Marchenko-Pastur "
                "bulk of its random start to a heavy tail**, and alpha falls. Here a small network trains live: an "
                "MLP 64 → 512 → 512 → 10 (ReLU, plain SGD) learns a 10-class task set by a random *teacher* "
                "network (inputs with a power-law covariance, like images; 2,000 training examples). Every "
                "checkpoint measures the 512 x 512 hidden matrix with the engine: eigenvalues of $W^\\top W$, "
                "power-law fit with xmin by KS distance (`full`, WeightWatcher's method), and the test accuracy.")
    a, b, c, d = st.columns(4)
    a.select_slider("learning rate", LEARNING_RATES, key=State.l_lr,
                    help="0.1 is the good setting; 0.02 learns slowly; 0.3-0.5 are too large")
    b.select_slider("batch size", BATCHES, key=State.l_batch, help="a smaller batch: noisier steps")
    c.select_slider("label noise", LABEL_NOISES, key=State.l_noise, format_func=lambda v: f"{v:.0%}",
                    help="share of training labels replaced by a random class (the test labels stay clean)")
    d.select_slider("steps", STEPS, key=State.l_steps, help="300 steps take about 2-4 s on 2 CPU cores, 1200 about 5-9 s")
    setup = TrainingSetup(lr=float(ss[State.l_lr]), batch=int(ss[State.l_batch]),
                          label_noise=float(ss[State.l_noise]), steps=int(ss[State.l_steps]))
    runs = ss[State.l_runs]                         # trained this session, newest first
    go_, clear = st.columns([1, 1])
    if go_.button("Train", type="primary", key="l_train", icon=":material/play_arrow:"):
        done = next((r for r in runs if r.setup == setup), None)
        if done is None:
            done = train_live(setup)
        ss[State.l_runs] = runs = ([done] + [r for r in runs if r is not done])[:MAX_RUNS]
    if runs and clear.button("Clear the runs", key="l_clear_runs", icon=":material/delete:"):
        ss[State.l_runs] = runs = []
    if not runs:
        st.info("Choose the knobs and press **Train**: the good setting (learning rate 0.1, batch 16, no label "
                "noise) first, then change one knob and train again to compare.", icon=":material/info:")
    else:
        newest = runs[0]
        first, last = newest.checkpoints[0], newest.checkpoints[-1]
        if newest.stopped:
            st.warning(newest.stopped.capitalize() + ".", icon=":material/warning:")
        m1, m2, m3, m4 = st.columns(4)
        m1.metric("alpha at step 0", f"{first.alpha:.2f}")
        m2.metric(f"alpha at step {last.step}", f"{last.alpha:.2f}", delta=f"{last.alpha - first.alpha:+.2f}",
                  delta_color="off")
        m3.metric("test accuracy", f"{last.test_accuracy:.1%}", help="chance: 10%")
        m4.metric("training time", f"{newest.seconds:.1f} s")
        show(training_esd_figure(newest), "lesson6_esd", model="", settings={"run": run_label(newest)}, key="l_t_esd")
        show(training_curves_figure(runs), "lesson6_alpha", model="", key="l_t_curves")
        st.caption("Left: alpha of the hidden layer at each checkpoint (shaded: the well-trained band 2-6); right: "
                   "test accuracy. The thick line is the last run; earlier runs of this session stay for comparison "
                   f"(up to {MAX_RUNS}). Measured (seed 0, 1200 steps, `benchmarks/bench_learn.py --training`): the good setting takes "
                   "alpha from about 7.7 (random) to 2.7 at 65% accuracy; learning rate 0.02 only reaches about 4.1; "
                   "0.5 overshoots below 2 (very heavy-tailed) and ends near 54%; 50% label noise slows the fall and "
                   "the accuracy peaks, then sinks as the network memorises the wrong labels; batch 4 with learning "
                   "rate 0.3 (noisy steps) drives alpha to about 2.2 and accuracy below 35%.")
