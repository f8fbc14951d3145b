"""Learn: what forgetting is, what SPIDER does, and the rule worked through on one small
tensor by the very code that trains the real model (``analysis.worked_example``)."""

from __future__ import annotations

import streamlit as st

from analysis.figures.learn import Panel, example_history, matrix_grid, tie_scatter
from analysis.worked_example import (
    TIE_ULPS,
    ExampleSettings,
    example_summary,
    near_tie,
    run_worked_example,
)
from app import common, presentation, tour

MARKED = 3  # entries outlined as "closest to the tie"
LEARNING_RATES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8)
ACCUMULATE = {
    "signed": "gradient (the paper)",
    "abs": "|gradient| (ablation)",
    "fisher": "gradient² — Fisher (ablation)",
}


@st.cache_data(show_spinner=False, max_entries=128)
def _example(settings: ExampleSettings):
    return run_worked_example(settings)


st.title("Learn: what SPIDER does")

# ------------------------------------------------------------------------------ in plain words
left, right = st.columns([1, 1], gap="large")
with left:
    st.markdown(
        "**Forgetting.** A multimodal model is first *pre-trained* on a broad mix of tasks "
        "(here: describing pictures, reading digits, naming colours and shapes). "
        "*Fine-tuning* it on one new task (here: counting triangles) moves its weights "
        "toward that task — and away from what pre-training put there. It gets better at the "
        "new task and worse at the old ones. That loss is **forgetting**.\n\n"
        "**SPIDER** asks, for every single weight, two questions: *how much did pre-training "
        "rely on it?* — **I**, from the size of the pre-trained weight θ0 — and *how much "
        "does the new task want it?* — **G**, from the gradients summed over fine-tuning. "
        "Both are ranks between 0 and 1 within the weight's own tensor, so they can be "
        "compared. Where the task wins (G > I) the weight may move, by a keep-weight **w**; "
        "elsewhere it is put back to θ0 after every step."
    )
with right:
    st.markdown("**The rule**, for each weight tensor, after every optimizer step:")
    # two lines: on one, S = Σ g_t ran off the right edge of a half-width column
    st.latex(r"I=\operatorname{rank}(\theta_0),\qquad G=\operatorname{rank}(S)")
    st.latex(r"S=\textstyle\sum_{t} g_t")
    st.latex(r"\operatorname{rank}(x)=\sigma\!\left(\frac{|x|-\operatorname{mean}|x|}"
             r"{\operatorname{std}|x|}\right)")
    st.latex(r"w=\begin{cases}\dfrac{G}{I+G} & \text{if } G>I\\[4pt] 0 & \text{otherwise}"
             r"\end{cases}")
    st.latex(r"w\leftarrow\min\!\Big(\frac{w}{\bar w_{+}},\;1\Big),\qquad "
             r"\bar w_{+}=\frac{\sum_{i:\,w_i>0} w_i}{\#\{i : w_i>0\}}")
    st.latex(r"\theta \leftarrow \theta_0\,(1-w) + \theta\,w")
    st.caption("σ is the logistic sigmoid; g_t the gradient of step t. w̄₊ is the average "
               "size of the non-zero keep-weights: their sum divided by how many there are "
               "(not the share of weights that are free). w = 0: the weight is pinned to θ0; "
               "w = 1: it moves freely.")

# ------------------------------------------------------------------------------ the example
st.header("Try it on one small weight tensor")
st.markdown(
    "Below, a 6 × 8 weight tensor θ0 is fine-tuned on a toy task that pulls every weight "
    "toward a target (with gradient noise, as mini-batches give). Each step is a real "
    "backward pass and a real `torch.optim.SGD` step followed by SPIDER's own code "
    "(`build_method(\"spider\", …)`, the function that trains the real model). "
    "Move the sliders and watch the mask **w** change."
)

# Every setting of the example is in the address, so that a reload, a shared link or a tab a
# teacher prepared shows the same example: the widgets are bound (bind="query-params", the
# key is the parameter's name); the seed is no widget, so it is written by hand.
if "learn_seed" not in st.session_state:
    _seed = st.query_params.get("learn_seed", "0")
    st.session_state["learn_seed"] = int(_seed) if _seed.isdigit() else 0


def _reseed() -> None:
    st.session_state["learn_seed"] += 1
    st.query_params["learn_seed"] = str(st.session_state["learn_seed"])

with st.container(border=True):
    c1, c2, c3, c4 = st.columns([3, 3, 3, 2])
    steps = c1.slider("Steps of fine-tuning", 1, 40, 10, key="learn_steps", bind="query-params",
                      help="How many optimizer steps have been taken; the pictures show the "
                           "state after the last one.")
    lr = c2.select_slider("Learning rate", LEARNING_RATES, value=0.2, key="learn_lr",
                          bind="query-params",
                          help="SGD step size: how far each step moves the weights.")
    noise = c3.slider("Gradient noise", 0.0, 3.0, 1.0, 0.1, key="learn_noise",
                      bind="query-params",
                      help="Random noise added to every step's gradient, in units of the "
                           "task's typical gradient. 0: a perfectly clean task.")
    with c4:
        st.write("")
        st.button("Re-seed", key="learn_reseed", on_click=_reseed,
                  help="Draw a new θ0, a new task target and new noise.")
        st.caption(f"seed {st.session_state['learn_seed']}")
    t1, t2, t3 = st.columns([2, 2, 4])
    binary = t1.toggle("Binary mask", key="learn_binary", bind="query-params",
                       help="Ablation: w = 1 wherever G > I (instead of G / (I + G)).")
    no_norm = t2.toggle("No normalisation", key="learn_no_norm", bind="query-params",
                        help="Ablation: keep the raw w = G / (I + G) instead of dividing by "
                             "the mean of the non-zero entries (and capping at 1).")
    if binary:
        t2.caption("No effect with the binary mask: every free weight already has w = 1, "
                   "so their mean is 1 and dividing by it changes nothing.")
    accumulate = t3.radio("S accumulates the", list(ACCUMULATE), format_func=ACCUMULATE.get,
                          horizontal=True, key="learn_accumulate", bind="query-params",
                          help="What SPIDER sums over the steps to rank the task's "
                               "importance G.")

settings = ExampleSettings(
    steps=int(steps), lr=float(lr), noise=float(noise), seed=int(st.session_state["learn_seed"]),
    mask="binary" if binary else "weighted", normalize=not no_norm, accumulate=accumulate,
)
example = _example(settings)
last = example.last
summary = example_summary(last)
n = last.mask.size
old_loss = example.history.set_index(["step", "method"])["upstream_loss"]

m1, m2, m3, m4 = st.columns(4)
m1.metric("Free to move (w > 0)", f"{round(summary['free_share'] * n)} of {n}",
          help="Weights where the task's importance G beats pre-training's I.")
m2.metric("Pinned to θ0 (w = 0)", f"{round(summary['pinned_share'] * n)} of {n}")
m3.metric("Mean keep-weight w", f"{summary['mask_mean']:.3f}",
          help="1 would be plain fine-tuning; 0 would keep the pre-trained tensor.")
# SPIDER's number, and plain fine-tuning's as the difference: "0.194 vs 0.327" was cut
# to "0.194 vs 0.…" in a quarter of a 1280 px window
spider_loss, plain_loss = old_loss[(steps, "spider")], old_loss[(steps, "full")]
m4.metric("Forgetting: SPIDER vs plain", f"{spider_loss:.3f}",
          delta=f"{spider_loss - plain_loss:+.3f} vs plain", delta_color="inverse",
          help="The toy's old-task loss after these steps (see ③), with SPIDER and with "
               f"plain fine-tuning (here {plain_loss:.3f}) on the same task and noise. "
               "Lower is better.")

tie = near_tie(last, n=MARKED)
marked = list(zip(tie["row"].tolist(), tie["col"].tolist()))
st.subheader(f"① Compare I and G, weight by weight → the mask w (after step {steps})")
st.caption("Each square is one weight: its row and column in the tensor. Dark = low, "
           "bright = high. Where G is brighter than I, w is blue (free); where it is not, "
           "w is white (0: pinned to θ0). Orange outlines: the weights closest to the tie "
           "I = G (see \"For the careful reader\" below).")
presentation.show_figure(matrix_grid(
    [[Panel("θ0: pre-trained weights", example.theta0, "signed", "theta0"),
      Panel("S: summed gradients so far", last.grad_sum, "signed", "s"), None],
     [Panel("I = rank(θ0)", last.importance_pre, "importance"),
      Panel("G = rank(S)", last.importance_ft, "importance"),
      Panel("w: keep-weight", last.mask, "mask")]],
    marked=marked, marked_label="closest to I = G",
), key="learn_rule", width="stretch")

st.subheader("② The merge: SPIDER keeps w × the optimizer's step")
st.caption("Left: where the last SGD step put each weight, measured from θ0. Middle: what "
           "SPIDER keeps of it, θ − θ0 = w × (θ_sgd − θ0): 0.00 where w = 0. Right: plain "
           "fine-tuning on the same task moves every weight. Red = up, blue = down, "
           "white = unchanged.")
presentation.show_figure(matrix_grid(
    [[Panel("proposed by SGD: θ_sgd − θ0", last.proposed - example.theta0, "signed", "d"),
      Panel("kept by SPIDER: θ − θ0", last.merged - example.theta0, "signed", "d"),
      Panel("plain fine-tuning: θ − θ0", last.full - example.theta0, "signed", "d")]],
), key="learn_merge", width="stretch")

st.subheader("③ Step by step")
st.caption("Red: SPIDER; blue: plain fine-tuning, on the same task and noise. This toy has "
           "no real old tasks; it stands in for them with a loss that charges each weight's "
           "change by the size of its pre-trained value, Σ|θ0|(θ − θ0)² / Σ|θ0| — SPIDER's "
           "own premise (I ranks |θ0|). The sample runs below measure real old-task scores.")
presentation.show_figure(example_history(example.history, current_step=steps), key="learn_history",
                width="stretch")

# ------------------------------------------------------------------------------ careful reader
# collapsed: a class needs the rule, not float32 rounding; a careful reader opens it. Its
# figure and table are drawn only once it is open (it reruns the page): the first page a
# visitor sees then loads neither the table's code nor a fourth chart (bench/bench_app.py)
with st.expander("For the careful reader: the mask jumps at I = G (float rounding)",
                 expanded=False, key="learn_careful", on_change="rerun",
                 bind="query-params") as careful:
    if careful.open:
        a, b = st.columns([3, 2], gap="large")
        with a:
            presentation.show_figure(tie_scatter(last.importance_pre, last.importance_ft, last.mask,
                                        marked=marked), key="learn_tie", width="stretch")
        with b:
            st.markdown(
                "Each dot is one weight of the example. Left of the dashed line (G ≤ I) it is pinned, "
                "w = 0; just right of it, w jumps to G/(I+G) ≈ ½, near 1 after normalisation. "
                "There is no in-between: a weight whose G and I agree to "
                "the last bit can land on either side in two correct programs, on another number "
                "of threads or processes, or on other hardware — and from then on the runs drift "
                "apart. Compare runs by their results, never bit for bit."
            )
            shown = tie.assign(**{"G − I": tie["gap"], "ulps": tie["ulps"].round()})
            st.dataframe(shown[["row", "col", "G − I", "ulps", "w"]], hide_index=True, width="stretch",
                         column_config={"G − I": st.column_config.NumberColumn(format="%.2e"),
                                        "ulps": st.column_config.NumberColumn(
                                            format="%d", help="float32 rounding steps between G and I"),
                                        "w": st.column_config.NumberColumn(format="%.3f")})
            at_tie = int((tie["ulps"] <= TIE_ULPS).sum())
            st.caption(
                f"The {MARKED} weights of this example closest to the tie (orange outlines above); "
                "ulps: how many float32 rounding steps G is from I. "
                + (f"{at_tie} of them are within {TIE_ULPS} float32 rounding steps of it: float "
                   "rounding alone decides their side." if at_tie else
                   f"None is within {TIE_ULPS} float32 rounding steps here; in a tensor of millions "
                   "of weights some always are.")
            )

# ------------------------------------------------------------------------------ start here
st.header("Start here: a tour of the sample runs")
st.markdown(
    "The app ships short fine-tunes of a tiny LLaVA (2 M parameters) on the counting task, "
    "one per method, 150 steps each. Five stops, in order: each link opens the exact view "
    "(its address holds every setting, so it can be opened in a tab beforehand, reloaded or "
    "shared), and the two sentences next to it are what to say there."
)
_SAMPLES = common.bundled_runs_root()
_present = [r for r in (tour.SPIDER, tour.FULL)
            if (_SAMPLES / r.split("/", 1)[1] / "run.json").exists()]
for stop in tour.STOPS:
    query = stop.query_params(_present)
    missing = bool(stop.runs) and common.QUERY_KEY not in query
    with st.container(border=True):
        link, say = st.columns([2, 5], vertical_alignment="center")
        link.page_link(stop.page, label=stop.label, icon=":material/arrow_forward:",
                       query_params=query, disabled=missing)
        say.markdown(stop.say if not missing else "The sample runs are not found.")


def _handout() -> str:
    """The one-page handout of the sample runs (made on click: it inlines plotly.js)."""
    from analysis import handout

    return handout.render_handout([_SAMPLES / r.split("/", 1)[1] for r in _present])


st.download_button(
    "Handout for the class (one printable page, HTML)", _handout, "spider-handout.html",
    "text/html", key="learn_handout", on_click="ignore", icon=":material/download:",
    disabled=not _present,
    help="The rule, the forgetting curve and SPIDER's layer heatmap from the sample runs, on "
         "one A4 or Letter page; opens offline. Also: python -m analysis.handout -o "
         "handout.html")

# ------------------------------------------------------------------------------ why it forgot
st.header("Why a run forgot")
why_left, why_right = st.columns(2, gap="large")
with why_left.container(border=True):
    st.page_link("views/forgetting.py", label="Why it forgot",
                 icon=":material/arrow_forward:",
                 query_params={common.QUERY_KEY: ["samples/full"]})
    st.markdown(
        "**Reading an attribution.** Each bar is one part of the update (a component, a "
        "layer or a kind of module) put back to its pre-trained value, the rest kept. "
        "*U recovered* is the old-task score that comes back: the forgetting that part "
        "caused. *D lost* is the new-task score that goes with it: what that part learned. "
        "The part to blame is one with a long green bar and a short red one; parts are "
        "not additive, since they interact.")
with why_right.container(border=True):
    st.page_link("views/compare.py", label="Output drift on Compare",
                 icon=":material/arrow_forward:",
                 query_params={common.QUERY_KEY: ["samples/spider", "samples/full"]})
    st.markdown(
        "**What the drift measures mean.** On the old task's questions: *kl_to_base* is how "
        "far the answer distribution moved from the base model's (0: not at all); "
        "*format errors* are answers in the wrong form (a superficial slip: the knowledge "
        "may still be there); *content errors* are answers of the right form but wrong "
        "(the knowledge itself is gone); *answer-type drift* is the share answered in the "
        "new task's form (the model answers every question like a counting question).")

# ------------------------------------------------------------------------------ other methods
with st.expander("Other methods in the sample runs: what each does, what it keeps in memory"):
    st.markdown(
        "- **dowser** (Model-Dowser): scores every linear weight once, before training, by "
        "output sensitivity × |W| × input on prompts the model writes itself; only the "
        "lowest-scoring 10 % of each matrix trains, the rest never leaves θ0. Keeps a bool "
        "mask (1 byte per masked weight) and the score's factor vectors; no θ0 copy.\n"
        "- **lwf** (Learning without Forgetting): adds λ·T²·KL(θ0 model's answers ‖ the "
        "model's) on each batch's answer tokens; no mask. Keeps θ0 of the trained tensors, "
        "swapped in for one no-grad forward pass per batch.\n"
        "- **spider-attn**, **full-mlp_gate_up**: component-selective training (`--train attn`: "
        "only the attention projections train; `--train mlp_gate_up`: only the MLP's gate and "
        "up); the rest of the model is frozen. Keep what their method keeps, for fewer "
        "weights.")
