"""Spiderscope's app. The full app (launch fine-tunes, watch them live, explore checkpoints)
arrives with the app issue; until then this page says what is here and what is coming."""

import streamlit as st

from spider.methods import available_methods, method_class

st.set_page_config(page_title="Spiderscope", layout="wide")
st.title("Spiderscope")
st.write(
    "See what fine-tuning does to a multimodal LLM: which parameters SPIDER lets the "
    "downstream task update, how much, and what it costs in pre-training ability."
)
st.info(
    "Coming next: launch short fine-tunes from the browser and watch them live, then explore "
    "the checkpoints (importance discrepancy per layer, mask density over steps, update "
    "heatmaps, method comparisons)."
)
st.subheader("Methods available in the library")
st.table(
    [{"method": name, "what it does": method_class(name).summary} for name in available_methods()]
)
