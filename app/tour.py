"""The Learn page's guided tour: five stops, each a link to the exact view a presenter shows
next, with two sentences to say there.

A stop's view is its address: the page and its query parameters. The runs are ``?runs=``
(:data:`app.common.QUERY_KEY`); the other settings are the widgets' own parameters, bound with
``bind="query-params"`` (a bound widget's parameter is its ``key``, its value the option as the
widget labels it). A reload or a shared link therefore opens the same view, and so does a stop
followed in a fresh tab. ``tests/app/test_tour.py`` opens every stop and checks the view.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from app import common

SPIDER, FULL = "samples/spider", "samples/full"
TOUR_TENSOR = "model.language_model.layers.3.mlp.down_proj.weight"
"""The Parameters stop's tensor: an MLP matrix of the tiny LLaVA that SPIDER masks."""

TRAIN_PRESET = "spider_vs_full"
"""The Train page's preset (``?preset=``): a SPIDER run and a full fine-tune, same settings."""


@dataclass(frozen=True)
class Stop:
    """One stop of the tour: a page, the query parameters of its view, what to say there."""

    page: str  # app/views file, as st.page_link takes it
    label: str
    runs: tuple[str, ...]  # sample runs the view shows (ids: samples/<name>)
    query: dict[str, str | list[str]] = field(default_factory=dict)  # beyond ?runs=
    say: str = ""  # two sentences a presenter can say

    def query_params(self, present: list[str]) -> dict[str, str | list[str]]:
        """The link's query parameters, with the sample runs that are ``present``."""
        runs = [r for r in self.runs if r in present]
        return {**({common.QUERY_KEY: runs} if runs else {}), **self.query}


STOPS: tuple[Stop, ...] = (
    Stop("views/compare.py", "1 · Compare: who forgot?", (SPIDER, FULL),
         say="Both runs learned the counting task about equally well, on the right. On the "
             "left, plain fine-tuning lost much of what pre-training taught; SPIDER kept "
             "most of it."),
    Stop("views/layers.py", "2 · Layers: where SPIDER let weights move", (SPIDER,),
         say="Each row is a layer, each column a logged step, at the last step of the SPIDER "
             "run. The colour is the share of the layer's weights SPIDER let move: about half, "
             "the rest stay at their pre-trained values."),
    Stop("views/parameters.py", "3 · Parameters: one weight matrix", (SPIDER,),
         {"param": TOUR_TENSOR},
         say="This is one real weight matrix: I is how much pre-training relied on each "
             "weight, G how much the new task wants it. Where G beats I the mask w lets the "
             "weight move; elsewhere it is put back after every step."),
    Stop("views/forgetting.py", "4 · Why it forgot", (FULL,),
         say="Here we undo one part of plain fine-tuning's update at a time and score again. "
             "The part whose undoing brings back the most old-task score, for the least "
             "new-task score, is the part that caused the forgetting."),
    Stop("views/train.py", "5 · Train: SPIDER vs full, yourself", (),
         {"preset": TRAIN_PRESET},
         say="This preset fills the form for a SPIDER run and a full fine-tune with the same "
             "settings. Press Launch: both train, one after the other, on one live chart, "
             "and \"Open in Compare\" shows them beside the samples."),
)
