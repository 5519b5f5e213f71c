"""Session state of the dashboard: the one home of every session-state key and its default,
the page list, and the guards a page calls first. Nothing here computes HT-SR quantities.
"""
from __future__ import annotations

import copy
import logging
import re
from pathlib import Path

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

try:   # internal API (Streamlit 1.67): without it every widget is re-assigned each run, as before
    from streamlit.runtime.state.common import is_keyed_element_id, user_key_from_element_id
    from streamlit.runtime.state.session_state_proxy import get_session_state
except ImportError:  # pragma: no cover - another Streamlit version
    get_session_state = None

from core import allocation
from core.analysis import analyze, cache_folder
from core.choices import MAPPINGS, PRUNE_METHODS, XMIN_METHODS
from core.models import resolve_source
from core.profiles import list_profiles
from dashboard.errors import USER_ERRORS, message
from dashboard.loaders import cached_model

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
log = logging.getLogger(__name__)

#: Page files relative to ``app.py``, in menu order (``app.py`` builds the navigation from this).
PAGES = {
    "home": ("pages/home.py", "Home / model", ":material/home:"),
    "spectra": ("pages/spectra.py", "Spectra", ":material/ssid_chart:"),
    "quality": ("pages/quality.py", "Layer quality", ":material/grid_on:"),
    "allocation": ("pages/allocation.py", "Allocation", ":material/tune:"),
    "prune": ("pages/prune.py", "Prune & compare", ":material/content_cut:"),
    "sweep": ("pages/sweep.py", "Sweep & tune", ":material/grid_view:"),
    "compare": ("pages/compare.py", "Compare", ":material/compare:"),
    "learn": ("pages/learn.py", "Learn HT-SR", ":material/school:"),
}

#: Metric columns a user may plot or allocate with (numeric columns of ``Analysis.table``).
METRICS = ["alpha", "alpha_hat", "log_norm", "log_spectral_norm", "log_alpha_norm", "stable_rank",
           "entropy", "mp_softrank", "num_spikes", "D", "sigma", "xmin", "rank"]

#: allocation methods, as core names them
ALLOCATIONS = allocation.METHODS
_ALLOCATION_LABELS = {"alpha": "AlphaPruning", "uniform": "uniform", "owl": "OWL"}


def allocation_label(method: str) -> str:
    """The name a page shows for an allocation method (AlphaPruning for "alpha")."""
    return _ALLOCATION_LABELS.get(method, method)


class State:
    """Every session-state key of every page, with its default (one rule: no page keeps a key of
    its own). Widget keys keep their value across pages (``setup()`` re-assigns those the browser
    does not show, so Streamlit does not clean them up); ``URL`` lists those also kept in the
    page's address, so that a reload or a shared link restores them."""

    # model and analysis (Home)
    source = "source"
    device = "device"
    xmin = "xmin"
    loaded = "loaded"            # core.models.LoadedModel (from the shared resource cache)
    analysis = "analysis"        # core.analysis.Analysis
    sources = "sources"          # {weights identity: the model text that loaded them}
    load_error = "load_error"
    load_seconds = "load_seconds"  # seconds the last "Load and analyse" spent loading the model
    linked = "linked"            # the model the page's address names, when it could not be restored: a message
    fig_format = "fig_format"    # the chart download format, "png" or "svg" (dashboard.exports)
    seen_jobs = "seen_jobs"      # ids of the jobs whose end a page has already rerun for
    # Spectra
    sp_blocks = "sp_blocks"
    sp_kinds = "sp_kinds"
    sp_linear = "sp_linear"
    sp_fit = "sp_fit"
    sp_mp = "sp_mp"
    sp_scan = "sp_scan"
    # Layer quality
    q_metric = "q_metric"
    q_block = "q_block"
    q_kind = "q_kind"
    q_open = "q_open"            # a matrix a click asked to open, (block, kind); used once
    # Allocation (A is what Prune uses; B is the comparison)
    a_source = "a_source"
    a_method = "a_method"
    a_metric = "a_metric"
    a_mapping = "a_mapping"
    a_sparsity = "a_sparsity"
    a_epsilon = "a_epsilon"
    a_auto = "a_auto"            # Prune tunes epsilon when the run starts (--epsilon auto)
    a_rmax = "a_rmax"
    a_dense = "a_dense"
    a_compare = "a_compare"
    b_method = "b_method"
    b_mapping = "b_mapping"
    b_epsilon = "b_epsilon"
    owl = "owl"                  # {OWL cache file: id of the job computing it}
    sens = "sens"                # {sensitivity cache file: id of the job measuring it}
    a_recipe_method = "a_recipe_method"   # the llm-compressor modifier of allocation A's recipe
    a_fallback = "a_metric_fallback"   # (table shown, the user's metric, the metric used instead)
    # Prune
    p_method = "p_method"
    p_nm = "p_nm"
    p_calib_n = "p_calib_n"
    p_seqlen = "p_seqlen"
    p_eval_windows = "p_eval_windows"
    p_save = "p_save"
    p_analyze = "p_analyze"
    p_job = "p_job"
    p_compare_runs = "p_compare_runs"  # the analysed runs "Compare with the dense model" opens
    p_compare_newest = "p_compare_newest"   # the newest of them when last shown (a newer one is picked)
    # Sweep & tune (calibration and evaluation sizes: Prune's p_calib_n, p_seqlen, p_eval_windows)
    s_methods = "s_methods"
    s_allocations = "s_allocations"
    s_sparsities = "s_sparsities"
    s_epsilons = "s_epsilons"    # this and the next five start from the Allocation page's settings
    s_metric = "s_metric"
    s_xmin = "s_xmin"
    s_mapping = "s_mapping"
    s_rmax = "s_rmax"
    s_dense = "s_dense"
    s_ray = "s_ray"
    t_epsilons = "t_epsilons"
    t_xmins = "t_xmins"
    t_metrics = "t_metrics"
    t_holdout = "t_holdout"
    s_job = "s_job"
    s_seeded = "s_seeded"        # the Allocation page's settings the sweep's were last set from
    s_handed = "s_handed"        # set by "Use this allocation": the whole page reruns once
    # Compare
    cmp_sources = "cmp_sources"  # the analyses compared (labels; the first is the reference)
    cmp_metric = "cmp_metric"
    cmp_target = "cmp_target"
    cmp_matrix = "cmp_matrix"
    cmp_fit = "cmp_fit"
    cmp_add = "cmp_add"
    cmp_extra = "cmp_extra"      # {label: core.compare.Entry} added with "Analyse and add"
    cmp_pending = "cmp_pending"  # the selection after an add (set before the widget exists)
    cmp_runs = "cmp_runs"        # run ids to preselect against their dense model (the Prune page)
    cmp_picks = "cmp_picks"      # {chart: the matrix its last click picked} (a chart keeps its selection)
    # Learn
    l_n = "l_n"
    l_m = "l_m"
    l_var = "l_var"
    l_mu = "l_mu"
    l_spike = "l_spike"
    l_seed = "l_seed"
    l_lr = "l_lr"                # watch a network learn: the knobs, and the runs trained this session
    l_batch = "l_batch"
    l_noise = "l_noise"
    l_steps = "l_steps"
    l_runs = "l_runs"
    l_lesson = "l_lesson"
    l_spike_var = "l_spike_var"
    l_phase_real = "l_phase_real"
    l_S = "l_S"
    l_eps = "l_eps"

    DEFAULTS = {
        source: "demo", device: "auto", xmin: "peak", loaded: None, sources: {}, analysis: None, load_error: None,
        sp_blocks: [0], sp_kinds: ["q"], sp_linear: False, sp_fit: True, sp_mp: True, sp_scan: False,
        q_metric: "alpha", q_block: 0, q_kind: "q",
        a_source: "loaded model", a_method: "alpha", a_metric: "alpha", a_mapping: "block",
        a_sparsity: 0.7, a_epsilon: 0.3, a_auto: True, a_rmax: 0.99, a_dense: [], a_compare: False,
        b_method: "uniform", b_mapping: "matrix", b_epsilon: 0.2,
        p_method: "wanda", p_nm: "none", p_calib_n: 8, p_seqlen: 128, p_eval_windows: 8, p_save: False, p_analyze: True,
        p_job: None, owl: {}, sens: {}, a_recipe_method: "wanda",
        s_methods: ["magnitude", "wanda"], s_allocations: ["uniform", "alpha"], s_sparsities: [0.5, 0.6, 0.7],
        s_epsilons: [0.3], s_metric: "alpha", s_xmin: "peak", s_mapping: "block", s_rmax: 0.99, s_dense: [],
        s_ray: "", t_epsilons: [0.1, 0.2, 0.3, 0.4], t_xmins: ["peak"], t_metrics: ["alpha", "alpha_hat"],
        t_holdout: 4, s_job: None,
        l_n: 800, l_m: 400, l_var: 1.0, l_mu: 1.5, l_spike: 1.5, l_seed: 0,
        l_lr: 0.1, l_batch: 16, l_noise: 0.0, l_steps: 1200, l_runs: [],
        l_lesson: "1 · Random matrix", l_spike_var: 1.0, l_phase_real: False, l_S: 0.7, l_eps: 0.3,
        load_seconds: None, linked: None, fig_format: "png", seen_jobs: set(), q_open: None, a_fallback: None,
        p_compare_runs: [], p_compare_newest: None, s_seeded: None, s_handed: False,
        cmp_sources: [], cmp_metric: "alpha", cmp_target: None, cmp_matrix: None, cmp_fit: True, cmp_add: "",
        cmp_extra: {}, cmp_pending: None, cmp_runs: None, cmp_picks: {},
    }
    #: the settings kept in the page's address (``?a_sparsity=0.6&sp_kinds=q&sp_kinds=k``), each
    #: with the values it may take there: a (low, high) range, the choices, a test, or None (any
    #: value of its default's type; the page keeps what exists). ``setup`` writes them as they
    #: change (those at their default are left out) and restores them in a new session (a reload,
    #: a shared link); the model itself goes as ``model``, ``xmin`` and ``device`` (``MODEL``).
    URL = {
        a_source: lambda v: v == "loaded model" or v.removeprefix("profile: ") in list_profiles(),
        a_method: ALLOCATIONS, a_metric: METRICS, a_mapping: MAPPINGS, a_sparsity: (0.0, 0.95),
        a_epsilon: (0.0, 0.9), a_auto: None, a_rmax: (0.5, 0.999), a_dense: None, a_compare: None,
        b_method: ALLOCATIONS, b_mapping: MAPPINGS, b_epsilon: (0.0, 0.9),
        sp_blocks: None, sp_kinds: None, sp_linear: None, sp_fit: None, sp_mp: None,
        q_metric: METRICS, p_method: PRUNE_METHODS,
        cmp_sources: None, cmp_metric: None,
    }
    MODEL = {"model": source, "xmin": xmin, "device": device}
    URL_READ = "_url_read"       # set once the address of the session's first run was read
    #: every widget's last value (``setup`` restores a widget key Streamlit dropped from here)
    KEPT = "_kept_widget_values"
    PAGE = "shown_page"          # script hash of the page shown by the last run
    #: keys that are not widgets (never re-assigned by ``setup``)
    OBJECTS = {loaded, analysis, sources, load_error, p_job, owl, sens, s_job, l_runs, load_seconds, linked,
               seen_jobs, q_open, a_fallback, p_compare_newest, s_seeded, s_handed, cmp_extra, cmp_pending,
               cmp_runs, cmp_picks}


def setup() -> None:
    """Call first on every page (``app.py`` calls it too): defaults, and widget values kept
    across page switches and reruns.

    Streamlit forgets or resurrects the widgets of pages that are not shown: while the job
    panel's fragment refreshes (every second while a job runs), a page switch brings back a
    widget's *first* value (S on Allocation returned to 0.70). So every widget's value is
    also kept in ``State.KEPT`` (a plain session key that Streamlit never touches): on the
    first run of a newly shown page the kept values win (a page switch changes no widget);
    on the other runs the widgets' values win and are kept.

    A key is set (``ss[key] = value``, which Streamlit keeps for a run) only where the browser
    did not send that widget's value with this run: after a page switch, for a widget of
    another page, or a value restored. Setting a widget the browser shows would send its value
    back to the browser, undoing a change the user made while this run was in flight (the
    browser then shows one value and the next click sends another)."""
    ss = st.session_state
    if State.URL_READ not in ss:        # a new session (a reload, a link): the address's work first
        ss[State.URL_READ] = True
        _from_url(ss)
    kept = ss.setdefault(State.KEPT, {})
    ctx = get_script_run_ctx()
    page = ctx.page_script_hash if ctx is not None else None
    switched = page is not None and ss.get(State.PAGE) not in (None, page)
    if page is not None:
        ss[State.PAGE] = page
    changed = []
    sent = _sent_by_browser()
    for key, default in State.DEFAULTS.items():
        if key in State.OBJECTS:
            if key not in ss:
                ss[key] = copy.copy(default)
            continue
        if sent is not None and key in sent and not switched and key in ss:
            kept[key] = copy.copy(ss[key])    # the browser's value: never sent back to it
            continue
        # other widgets: their value from before (Streamlit may have dropped it); without the
        # browser's list (another Streamlit), the widgets' values win except after a page switch
        if key in kept and (sent is not None or switched or key not in ss):
            value = kept[key]
            if key in ss and ss[key] != value:
                changed.append(key)
        else:
            value = ss[key] if key in ss else copy.copy(default)
        ss[key] = value          # re-assigned: Streamlit keeps a key set this run
        kept[key] = copy.copy(value)
    if changed:
        log.info("widget values restored from the kept ones: %s", ", ".join(changed))
    _remember_source(ss)
    if ss[State.loaded] is not None:
        ss[State.linked] = None
    to_url()


# --- the page's address: settings and model of the session -----------------------------------

def _encode(value: object) -> list[str]:
    """A setting as query values: a list as one value per item, a bool as 1/0, a float in short."""
    items = value if isinstance(value, (list, tuple)) else [value]
    out = ["1" if v is True else "0" if v is False else f"{v:.6g}" if isinstance(v, float) else str(v) for v in items]
    return out if isinstance(value, (list, tuple)) else out[:1]


def _decode(key: str, values: list[str]) -> object:
    """A query value of ``key`` as its default's type, checked against ``State.URL[key]``;
    ValueError when it is not one the page could show."""
    default, allowed = State.DEFAULTS[key], State.URL[key]

    def one(text: str, like: object) -> object:
        if isinstance(like, bool):
            if text.lower() not in ("1", "0", "true", "false"):
                raise ValueError(text)
            return text.lower() in ("1", "true")
        return type(like)(text) if isinstance(like, (int, float)) else text

    if isinstance(default, list):
        like = default[0] if default else ""
        return [one(v, like) for v in values if v != ""]
    value = one(values[-1], default if default is not None else "")
    if isinstance(allowed, tuple) and len(allowed) == 2 and all(isinstance(x, float) for x in allowed):
        if not allowed[0] <= value <= allowed[1]:
            raise ValueError(values[-1])
    elif callable(allowed):
        if not allowed(value):
            raise ValueError(values[-1])
    elif allowed is not None and value not in allowed:
        raise ValueError(values[-1])
    return value


def _from_url(ss) -> None:
    """A new session: the settings the address holds (a value a page could not show is left out,
    with a warning naming it), then the model it names, from the disk caches."""
    params = st.query_params
    bad = []
    for key in State.URL:
        if key in params:
            try:
                ss[key] = _decode(key, params.get_all(key))
            except (ValueError, TypeError):
                bad.append(f"{key}={'&'.join(params.get_all(key))}")
    for name, valid in (("xmin", lambda v: v in XMIN_METHODS),
                        ("device", lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v))):
        if name in params:
            if valid(params[name]):
                ss[State.MODEL[name]] = params[name]
            else:
                bad.append(f"{name}={params[name]}")
    if bad:
        st.warning("Left out of the page's address, not valid here: " + ", ".join(f"`{b}`" for b in bad)
                   + " (the defaults are used instead).", icon=":material/link_off:")
    if params.get("model", "").strip():
        ss[State.source] = params["model"].strip()
        _restore_model(ss, ss[State.source], ss.get(State.xmin, "peak"), ss.get(State.device, "auto"))
        if ss.get(State.linked):
            st.warning(ss[State.linked], icon=":material/link:")


def _restore_model(ss, text: str, xmin: str, device: str) -> None:
    """Load the model ``text`` and its analysis with ``xmin`` when that analysis is in the disk
    cache (a reload is then as fast as a page switch); else ``State.linked`` says it must be
    analysed first (the Home box holds it), never another model in its place."""
    what = f"{text} (xmin {xmin})"
    try:
        src = resolve_source(text)
        if not cache_folder(src.identity(), xmin).is_dir():
            ss[State.linked] = (f"The page's address names the model **{what}**, which has no cached analysis on "
                                "this machine: it must be analysed first. Press **Load and analyse** on Home / model "
                                "(the model box holds it).")
            return
        with st.spinner(f"Restoring {what} from the page's address (the analysis from the disk cache)..."):
            loaded = cached_model(src.identity(), text, device)
            analysis = analyze(loaded, xmin=xmin, device=device)
    except (*USER_ERRORS, RuntimeError) as exc:
        ss[State.linked] = f"The model the page's address names, {what}, could not be restored: {message(exc)}"
        return
    ss[State.loaded], ss[State.analysis] = loaded, analysis
    ss.setdefault(State.sources, {})[loaded.identity] = text
    log.info("restored %s from the page's address", what)


def _model_params(ss) -> dict[str, str]:
    """``model``, ``xmin`` and ``device`` of the address: the loaded model and its analysis's xmin,
    or the model the address named while it could not be restored."""
    analysis, source = ss.get(State.analysis), loaded_source()
    if analysis is not None and source is not None:
        return {"model": source, "xmin": analysis.xmin, "device": ss[State.device]}
    if ss.get(State.linked):
        return {"model": ss[State.source], "xmin": ss[State.xmin], "device": ss[State.device]}
    return {}


def to_url() -> None:
    """Write the session's settings (``State.URL``) and model into the page's address: each
    parameter that changed, those at their default left out. ``setup`` calls it every run; a
    page that changes a setting from code after ``setup`` may call it again."""
    ss, params = st.session_state, st.query_params
    wanted = {name: [value] for name, value in _model_params(ss).items()
              if name == "model" or value != State.DEFAULTS[State.MODEL[name]]}
    for key in State.URL:
        if key in ss and _encode(ss[key]) != _encode(State.DEFAULTS[key]) and ss[key] is not None:
            wanted[key] = _encode(ss[key]) or [""]
    for name in [*State.MODEL, *State.URL]:
        if name not in wanted and name in params:
            del params[name]
        elif name in wanted and params.get_all(name) != wanted[name]:
            params[name] = wanted[name]


def _sent_by_browser() -> set[str] | None:
    """The keys of the widgets whose values the browser sent with this run (the browser's
    widgets; empty outside a Streamlit run; ``None`` where this Streamlit does not tell)."""
    if get_session_state is None:
        return None
    if get_script_run_ctx() is None:
        return set()
    return {key for w in get_session_state().get_widget_states()
            if is_keyed_element_id(w.id) and (key := user_key_from_element_id(w.id)) is not None}


def assign(key: str, value: object) -> None:
    """Set a widget's value from code (e.g. before ``st.switch_page``): kept too, so the next
    page's first run shows it instead of restoring the previous value."""
    st.session_state[key] = value
    st.session_state.setdefault(State.KEPT, {})[key] = copy.copy(value)


def _remember_source(ss) -> None:
    """Note which model text loaded ``State.loaded`` (the Home text box while it names those
    weights), so later edits of the box do not change the model the other pages use."""
    loaded = ss[State.loaded]
    if loaded is None or loaded.identity in ss[State.sources]:
        return
    text = (ss[State.source] or "demo").strip() or "demo"
    try:
        if resolve_source(text).identity() == loaded.identity:
            ss.setdefault(State.sources, {})[loaded.identity] = text
    except (ValueError, OSError):
        pass


def loaded_source() -> str | None:
    """The model text (for the CLI's ``--model``) that loads the session's loaded model, or
    None when no model is loaded or its text is not known (a GGUF file typed and replaced at once)."""
    ss = st.session_state
    loaded = ss.get(State.loaded)
    if loaded is None:
        return None
    kind = loaded.identity.split(":", 1)[0]
    known = ss.get(State.sources, {}).get(loaded.identity)
    if known is not None:
        return known
    if kind == "demo":
        return "demo"
    if kind == "hub":
        return loaded.source
    if kind == "folder" and loaded.path is not None:
        return str(loaded.path)
    return None


def job_model() -> tuple[str, str, str]:
    """(model text for a job's ``--model``, weights identity, label): the model loaded on Home,
    or the Home text box while none is loaded; a message and ``st.stop()`` when neither is usable."""
    loaded = st.session_state.get(State.loaded)
    source = loaded_source()
    if loaded is not None and source is None:
        st.error(f"The loaded model {loaded.source} cannot be named for a background job: load it again on "
                 "Home / model.", icon=":material/error:")
        st.stop()
    if loaded is not None:
        return source, loaded.identity, loaded.source
    source = (st.session_state.get(State.source) or "demo").strip() or "demo"
    try:
        src = resolve_source(source)
        return source, src.identity(), src.label
    except (ValueError, FileNotFoundError) as exc:
        st.error(f"The model on Home / model is not usable: {exc}")
        st.stop()


def require_analysis():
    """The current analysis, or a hint with a link to Home and ``st.stop()``."""
    analysis = st.session_state.get(State.analysis)
    if analysis is None and st.session_state.get(State.linked):
        st.warning(st.session_state[State.linked], icon=":material/link:")
        st.page_link(PAGES["home"][0], label="Go to Home / model", icon=":material/home:")
        st.stop()
    if analysis is None:
        st.info("No model analysed yet. Choose a model on **Home / model** (the demo model works offline) "
                "and press **Load and analyse**.", icon=":material/info:")
        st.page_link(PAGES["home"][0], label="Go to Home / model", icon=":material/home:")
        st.stop()
    if analysis.table.empty:
        st.warning("This model has no prunable matrices in its transformer blocks: nothing to show.")
        st.stop()
    return analysis


def analysis_page(title: str):
    """The opening of a page that shows the analysed model: setup, title, the analysis (or a
    hint and ``st.stop()``) and a caption naming the model."""
    setup()
    st.title(title)
    analysis = require_analysis()
    st.caption(f"{analysis.model} · xmin **{analysis.xmin}** · {len(analysis.table)} matrices in "
               f"{analysis.table['block'].nunique()} blocks")
    return analysis
