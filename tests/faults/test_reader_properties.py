"""Property-based tests (hypothesis) of the run-directory reader and the parameter-name
parser on arbitrary input: a clear error (a ``UserError`` naming the file) or a result,
never a crash; ``list_runs`` never raises.

In ``make test`` the examples are derandomized (the same ones on every machine, so a
failure is reproducible); ``-m slow`` runs many more, freshly drawn.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from harness import changed, record, snapshot
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import analysis
from spider.errors import UserError
from spider.naming import ParamName, parse_param_name
from tests.sample_logs import layers_jsonl_lines

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "sample_checkpoints" / "runs" / "spider"
BASE = ROOT / "sample_checkpoints" / "tiny-llava-base"

CI = settings(max_examples=120, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
MANY = settings(max_examples=500, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

COMPONENTS = {"vision", "projector", "llm", "other"}
MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "fc1",
           "fc2", "embeddings", "norm", "lm_head", "other"}


# ------------------------------------------------------------------------- the parser
def _check_parsed(name) -> ParamName:
    parsed = parse_param_name(name)
    assert isinstance(parsed, ParamName)
    assert parsed.component in COMPONENTS
    assert parsed.layer is None or (isinstance(parsed.layer, int) and parsed.layer >= 0)
    assert parsed.module in MODULES or parsed.module.startswith("linear_"), parsed
    return parsed


@CI
@given(st.text())
@example("model.language_model.layers.\u00b2.mlp.fc1.weight")  # a digit int() refuses
@example("base_model.model.base_model.model")
@example("")
def test_any_text_parses_to_a_component_layer_and_module(name):
    _check_parsed(name)


name_part = st.sampled_from(["model", "language_model", "vision_tower", "vision_model",
                             "multi_modal_projector", "layers", "layer", "blocks", "h",
                             "encoder", "decoder", "self_attn", "mlp", "q_proj", "down_proj",
                             "fc1", "out_proj", "input_layernorm", "embed_tokens", "lm_head",
                             "linear_1", "weight", "bias", "0", "3", "12"]) | st.text(max_size=8)


@CI
@given(st.lists(name_part, max_size=10))
def test_names_from_real_parts_parse_and_peft_wrapping_changes_nothing(parts):
    name = ".".join(parts)
    parsed = _check_parsed(name)
    if parts and parts[-1] in ("weight", "bias"):
        # what PEFT makes of a LoRA-wrapped linear, and of a modules_to_save copy
        lora = "base_model.model." + ".".join([*parts[:-1], "lora_A", "default", parts[-1]])
        saved = "base_model.model." + ".".join([*parts[:-1], "modules_to_save", "default",
                                                parts[-1]])
        assert _check_parsed(lora) == parsed
        assert _check_parsed(saved) == parsed


@CI
@given(st.sampled_from(["layers", "blocks", "h", "layer", "resblocks"]),
       st.integers(min_value=0, max_value=10**6), st.sampled_from(["q_proj", "fc2", "down_proj"]))
def test_the_layer_is_the_number_after_the_block_container(container, number, module):
    parsed = _check_parsed(f"model.language_model.{container}.{number}.x.{module}.weight")
    assert parsed.layer == number and parsed.component == "llm"


@pytest.mark.parametrize("bad", [None, 3, b"model.layers.0.weight", ["a"]])
def test_a_name_that_is_not_text_is_a_clear_type_error(bad):
    with pytest.raises(TypeError, match="parameter name must be text"):
        parse_param_name(bad)


# ------------------------------------------------------------------------- the run reader
def _fresh_run(directory: Path) -> Path:
    """A small copy of the sample SPIDER run (logs cut short, no checkpoints)."""
    run = directory / "run"
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    info = json.loads((SAMPLE / "run.json").read_text())
    info["model"] = {"path": str(BASE), "relative": "", "given": str(BASE)}
    (run / "run.json").write_text(json.dumps(info))
    metrics = (SAMPLE / "metrics.jsonl").read_text().splitlines(keepends=True)[:60]
    (run / "metrics.jsonl").write_text("".join(metrics))
    (run / "layers.jsonl").write_text("\n".join(layers_jsonl_lines(SAMPLE)[:40]) + "\n")
    return run


def _read_everything(run_dir: Path, culprit: str) -> str:
    """Every read of the run's logs; 'ok' or 'error' (a UserError naming ``culprit``).
    Anything else fails the test."""
    listed = analysis.list_runs(run_dir.parent)  # never raises for a bad run
    assert len(listed) == 1
    try:
        run = analysis.load_run(run_dir)
        for frame in ("metrics", "train", "summary", "layers"):
            getattr(run, frame)
        analysis.load_run(run_dir).status  # noqa: B018
    except UserError as err:
        assert culprit in str(err), (culprit, str(err))
        if culprit == "run.json":  # nothing of the run reads: the listing must say why
            assert not listed["ok"].iloc[0] and culprit in listed["problem"].iloc[0], listed
        return "error"
    return "ok"


json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=6)
EVENT_KEYS = ["event", "step", "split", "metric", "value", "n", "loss", "lr", "grad_norm",
              "seconds"]
ROW_KEYS = ["step", "param", "numel", "mask_mean", "mask_density", "update_norm",
            "update_rel_norm", "theta0_norm", "importance_pre_mean"]


def _rows(keys: list[str]):
    plausible = {"event": st.sampled_from(["train", "eval", "other"]),
                 "split": st.sampled_from(["upstream", "downstream"]),
                 "metric": st.sampled_from(["score", "task:x"]),
                 "param": st.sampled_from(["model.language_model.layers.0.mlp.fc1.weight"])}
    return st.dictionaries(st.sampled_from(keys),
                           st.one_of(json_value, *plausible.values()), max_size=len(keys))


class _Tally:
    """Outcomes of the generated examples of one test, for RELIABILITY.md."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.lost = 0  # files a read changed (readers must never write)

    def add(self, outcome: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1

    def summary(self) -> str:
        return ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items()))


def _property_test(fault: str, run_test):
    """Run a hypothesis test, then record how many examples it tried and what they did."""
    tally = _Tally()
    problems = []
    try:
        run_test(tally)
    except BaseException as err:
        problems.append(f"{type(err).__name__}: {str(err)[:300]}")
        raise
    finally:
        record(fault, "arbitrary input (hypothesis)", sum(tally.counts.values()),
               f"a result or a UserError naming the file, never a crash: {tally.summary()}",
               problems, data_lost=tally.lost)


def _read_and_compare(tally: _Tally, run: Path, culprit: str) -> None:
    """Read everything; the run's files must be byte for byte as before."""
    before = snapshot(run)
    tally.add(_read_everything(run, culprit))
    gone = changed(before, snapshot(run))
    tally.lost += len(gone)
    assert not gone, f"reading changed {gone}"


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="spider-prop-") as folder:
        yield Path(folder)


def _run_json_bytes(scratch: Path, settings_):
    @settings_
    @given(st.binary(max_size=400) | st.text(max_size=200).map(str.encode)
           | json_value.map(lambda v: json.dumps(v).encode()))
    def check(tally, data):
        run = _fresh_run(scratch)
        (run / "run.json").write_bytes(data)
        _read_and_compare(tally, run, "run.json")

    return check


def _metrics_lines(scratch: Path, settings_, file: str, keys):
    @settings_
    @given(st.lists(st.binary(max_size=60) | _rows(keys).map(lambda r: json.dumps(r).encode()),
                    min_size=1, max_size=4),
           st.integers(min_value=0, max_value=60), st.booleans())
    def check(tally, lines, where, replace_all):
        run = _fresh_run(scratch)
        old = (run / file).read_bytes().splitlines(keepends=True)
        new = [line.replace(b"\n", b" ") + b"\n" for line in lines]
        data = new if replace_all else old[:where] + new + old[where:]
        (run / file).write_bytes(b"".join(data))
        _read_and_compare(tally, run, file)

    return check


@pytest.mark.parametrize("target", ["run.json", "metrics.jsonl", "layers.jsonl"])
def test_arbitrary_bytes_in_a_run_file_are_a_clear_error_or_read(scratch, target):
    test = (_run_json_bytes(scratch, CI) if target == "run.json" else
            _metrics_lines(scratch, CI, target, EVENT_KEYS if target == "metrics.jsonl"
                           else ROW_KEYS))
    _property_test(f"arbitrary bytes and JSON rows in {target}", lambda tally: test(tally))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["run.json", "metrics.jsonl", "layers.jsonl"])
def test_many_more_arbitrary_run_files(scratch, target):
    test = (_run_json_bytes(scratch, MANY) if target == "run.json" else
            _metrics_lines(scratch, MANY, target, EVENT_KEYS if target == "metrics.jsonl"
                           else ROW_KEYS))
    _property_test(f"arbitrary bytes and JSON rows in {target} (slow, many examples)",
                   lambda tally: test(tally))


@pytest.mark.slow
@settings(max_examples=5000, deadline=None, database=None)
@given(st.text())
def test_many_more_names(name):
    _check_parsed(name)
