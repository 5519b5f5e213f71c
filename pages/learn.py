"""Learn HT-SR: short interactive lessons on the same engine (spectra, fits, MP law, allocation)."""
import numpy as np
import plotly.graph_objects as go
import streamlit as st

from core.allocation import allocate
from core.fit import fit_power_law
from core.metrics import mp_bulk_edges
from core.profiles import load_profile
from core.spectra import eigenvalues
from dashboard.figures import LAYOUT, esd_figure
from dashboard.state import State, setup

setup()
ss = st.session_state
st.title("Learn HT-SR")
st.markdown("Heavy-Tailed Self-Regularization reads how well a layer is trained from the **spectrum** of its "
            "weight matrix $W$ ($N \\times M$): the eigenvalues $\\lambda_i$ of $X = W^\\top W$, i.e. the "
            "squared singular values. Move the sliders; every number below comes from Spectrascope's engine.")


@st.cache_data(show_spinner=False, max_entries=64)
def lesson_eigs(kind: str, n: int, m: int, var: float, mu: float, spike: float, seed: int) -> np.ndarray:
    """Eigenvalues of a synthetic matrix: gaussian, pareto (tail index mu) or spike (gaussian + theta u v^T)."""
    rng = np.random.default_rng(seed)
    if kind == "pareto":   # symmetric Pareto entries: P(|w| > t) = t^-mu for t >= 1
        w = rng.pareto(mu, size=(n, m)) + 1.0
        w *= rng.choice([-1.0, 1.0], size=(n, m))
    else:
        w = rng.normal(0.0, np.sqrt(var), size=(n, m))
        if kind == "spike":
            u, v = rng.normal(size=n), rng.normal(size=m)
            w += spike * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v))
    return eigenvalues(w)


def synthetic_row(n: int, m: int, var: float, eigs: np.ndarray, fit=None) -> dict:
    row = {"rows": n, "cols": m, "w_var": var, "alpha": np.nan, "xmin": np.nan, "n_tail": 0}
    if fit is not None and fit.ok:
        row.update(alpha=fit.alpha, xmin=fit.xmin, n_tail=fit.n_tail)
    return row


def lesson(text: str, formula: str, slider: str, low: float, high: float, step: float, key: str) -> float:
    """A lesson's opening: its text, its formula and its one slider; returns the slider's value."""
    st.markdown(text)
    st.latex(formula)
    st.slider(slider, low, high, step=step, key=key)
    return float(ss[key])


def noise_esd(kind: str, label: str, var: float, theta: float = 0.0):
    """(eigenvalues, MP bulk edges, linear ESD figure without a fit) of a gaussian matrix (plus a spike)."""
    eigs = lesson_eigs(kind, N, M, var, 0.0, theta, seed)
    edges = mp_bulk_edges(rows=N, cols=M, w_var=var)
    fig = esd_figure([{"label": label, "row": synthetic_row(N, M, var, eigs), "eigs": eigs}], linear=True,
                     show_fit=False)
    return eigs, edges, fig


c1, c2, c3 = st.columns(3)
c1.slider("N (rows)", 100, 2000, step=50, key=State.l_n)
c2.slider("M (columns)", 50, 1000, step=50, key=State.l_m)
c3.number_input("random seed", 0, 10_000, key=State.l_seed)
N, M, seed = max(ss[State.l_n], ss[State.l_m]), min(ss[State.l_n], ss[State.l_m]), int(ss[State.l_seed])
if ss[State.l_n] < ss[State.l_m]:
    st.caption(f"Using the larger side as N: {N} x {M}.")

tabs = st.tabs(["1 · Random matrix", "2 · Heavy tails", "3 · Spikes", "4 · Phases of training", "5 · alpha → sparsity"])

with tabs[0]:
    var = lesson("A matrix of i.i.d. entries with variance $\\sigma^2$ has no learned structure. Its ESD follows "
                 "the **Marchenko-Pastur** law: with $Q = N/M \\ge 1$ and $X = W^\\top W / N$,",
                 r"\rho(\lambda) = \frac{Q}{2\pi\sigma^2\lambda}\sqrt{(\lambda_+-\lambda)(\lambda-\lambda_-)},\qquad "
                 r"\lambda_\pm = \sigma^2\left(1 \pm \tfrac{1}{\sqrt{Q}}\right)^2",
                 "variance σ²", 0.1, 4.0, 0.1, State.l_var)
    eigs, (lo, hi), fig = noise_esd("gaussian", "gaussian", var)
    st.plotly_chart(fig, width="stretch", key="l_mp")
    st.caption(f"Bulk edges (units of $W^\\top W$): λ- = {lo:.4g}, λ+ = {hi:.4g}; largest eigenvalue "
               f"{eigs.max():.4g}. No eigenvalue leaves the bulk: nothing was learned.")

with tabs[1]:
    mu = lesson("Training correlates the weights. HT-SR models that with **heavy-tailed** entries: "
                "$P(|W_{ij}| > t) \\sim t^{-\\mu}$. For $\\mu < 2$ the ESD itself becomes a power law "
                "$\\rho(\\lambda) \\sim \\lambda^{-\\alpha}$ with",
                r"\alpha = 1 + \frac{\mu}{2}\quad(\mu < 2);\qquad 2<\mu<4:\ \text{finite-size power law};\qquad "
                r"\mu > 4:\ \text{Marchenko-Pastur again}",
                "tail index μ of the entries", 0.5, 5.0, 0.1, State.l_mu)
    eigs = lesson_eigs("pareto", N, M, 1.0, mu, 0.0, seed)
    fit = fit_power_law(eigs, xmin="full")
    fig = esd_figure([{"label": f"μ={mu:g}", "row": synthetic_row(N, M, np.nan, eigs, fit), "eigs": eigs}],
                     show_mp=False)
    st.plotly_chart(fig, width="stretch", key="l_ht")
    a, b = st.columns(2)
    a.metric("fitted alpha", f"{fit.alpha:.2f}" if fit.ok else "no fit")
    b.metric("theory 1 + μ/2", f"{1 + mu / 2:.2f}" if mu < 2 else "n/a (μ ≥ 2)")
    st.caption("Smaller μ: heavier tails, smaller alpha. LLM layers typically show alpha between 2 and 6.")

with tabs[2]:
    strength = lesson("A learned feature can also appear as a **spike**: a rank-one signal $\\theta\\,u v^\\top$ "
                      "(unit vectors) added to noise of variance $\\sigma^2$. It leaves the bulk only above the "
                      "detection (BBP) threshold, in units of $W^\\top W$:",
                      r"\theta_c = \sigma\,(NM)^{1/4},\qquad \lambda_{\text{spike}} = "
                      r"\frac{(\theta^2 + \sigma^2 N)(\theta^2 + \sigma^2 M)}{\theta^2}\ \ (\theta > \theta_c)",
                      "signal strength θ / θc", 0.0, 3.0, 0.05, State.l_spike)
    var = float(ss[State.l_var])
    theta_c = np.sqrt(var) * (N * M) ** 0.25
    theta = strength * theta_c
    eigs, (lo, hi), fig = noise_esd("spike", "noise + spike", var, theta)
    fig.add_vline(x=float(eigs.max()), line=dict(color="#E45756", width=2), annotation_text="largest λ")  # linear axis
    st.plotly_chart(fig, width="stretch", key="l_spike_fig")
    predicted = (theta**2 + var * N) * (theta**2 + var * M) / theta**2 if theta > theta_c else hi
    a, b, c = st.columns(3)
    a.metric("largest eigenvalue", f"{eigs.max():.4g}")
    b.metric("prediction", f"{predicted:.4g}", help="the spike formula above θc, the bulk edge λ+ below it")
    c.metric("bulk edge λ+", f"{hi:.4g}")
    st.caption("Below θc the signal is invisible in the spectrum; above it one eigenvalue separates from the bulk.")

with tabs[3]:
    st.markdown("Martin & Mahoney describe training as a path through **phases**: *random-like* (fits MP) → "
                "*bleeding-out* → *bulk + spikes* → *bulk-decay* → *heavy-tailed* → *rank-collapse*. "
                "Here are three layers of the loaded model: the most random-like (largest alpha), a typical "
                "one (median alpha) and the most heavy-tailed (smallest alpha).")
    analysis = ss[State.analysis]
    if analysis is None:
        st.info("Load a model on **Home / model** to see its own layers here.")
    else:
        t = analysis.table[analysis.table["alpha"].notna()].sort_values("alpha")
        if t.empty:
            st.info("No matrix of this model has a power-law fit.")
        else:
            picks = [("most random-like", t.iloc[-1]), ("typical", t.iloc[len(t) // 2]),
                     ("most heavy-tailed", t.iloc[0])]
            cols = st.columns(3)
            for col, (what, r) in zip(cols, picks):
                fig = esd_figure([{"label": f"{r['block']}.{r['kind']}", "row": r.to_dict(),
                                   "eigs": analysis.eigs[r["name"]]}])
                fig.update_layout(height=320, showlegend=False, title=f"{what}: α = {r['alpha']:.2f}")
                col.plotly_chart(fig, width="stretch", key=f"phase_{what}")
                col.caption(f"`{r['name']}` · {r['num_spikes']:.0f} eigenvalues above λ+ · {r['status']}")

with tabs[4]:
    st.markdown("AlphaPruning turns each block's mean alpha $m_i$ into a sparsity: a linear map into "
                "$[1-\\varepsilon, 1+\\varepsilon]$, then a rescale so the parameter-weighted mean is the target $S$:")
    st.latex(r"q_i = (1-\varepsilon) + 2\varepsilon\,\frac{m_i - \min m}{\max m - \min m},\qquad "
             r"r_i = q_i\,\frac{S\sum_j n_j}{\sum_j n_j q_j}")
    st.markdown("Larger alpha = less well trained = pruned more.")
    analysis = ss[State.analysis]
    table = analysis.table if analysis is not None else load_profile("llama-7b-hf")
    source = analysis.model if analysis is not None else "published LLaMA-7B profile"
    a, b = st.columns(2)
    S = a.slider("target sparsity S", 0.1, 0.9, 0.7, 0.05, key="l_S")
    eps = b.slider("ε", 0.0, 0.8, 0.3, 0.05, key="l_eps")
    try:
        ratios = allocate(table, sparsity=S, epsilon=eps).ratios
    except ValueError as exc:
        st.error(str(exc))
    else:
        blocks = ratios.groupby("block").agg(metric=("metric", "mean"), ratio=("ratio", "mean"))
        fig = go.Figure(go.Scatter(x=blocks["metric"], y=blocks["ratio"], mode="markers+text",
                                   text=blocks.index.astype(str), textposition="top center",
                                   marker=dict(size=9, color="#3E5C9A")))
        fig.add_hline(y=S, line=dict(dash="dash"), annotation_text="S")
        fig.update_layout(**{**LAYOUT, "height": 360}, title=f"block mean alpha → block sparsity ({source})",
                          xaxis_title="block mean alpha", yaxis_title="sparsity ratio")
        st.plotly_chart(fig, width="stretch", key="l_alloc")
