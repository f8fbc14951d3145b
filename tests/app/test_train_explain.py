"""The Train page's "Explain a finished run" section (AppTest): a finished run of the user's
is queued for ``python -m analysis.attribute``; its state, log and a link to the result."""

from __future__ import annotations

from app import jobs
from tests.app.test_attribution_jobs import _done_run


def test_a_finished_run_is_queued_for_attribution_and_its_result_linked(
        app_page, runs_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(jobs, "ensure_supervisor", lambda root: False)  # the test works it
    _done_run(runs_dir)
    at = app_page("train")
    assert not at.exception
    assert any(s.value == "Explain a finished run" for s in at.subheader)
    at.selectbox(key="train_explain_run").set_value("finished")
    at.selectbox(key="train_explain_by").set_value("module")
    at.button(key="train_explain_queue").click().run()
    assert not at.exception
    [job] = jobs.pending_jobs(runs_dir)
    assert job.kind == jobs.ATTRIBUTE and job.args[:2] == ["--by", "module"]
    text = " ".join(m.value for m in at.markdown)
    assert job.name in text and "queued" in text
    # the training run list does not list the job as a run
    assert jobs.jobs_overview(runs_dir) == []
    jobs.work_queue(runs_dir)
    at.run()
    assert not at.exception
    assert "done" in " ".join(m.value for m in at.markdown if job.name in m.value)
    links = {link.proto.label: link.proto for link in at.page_link}
    assert "See why finished forgot" in links
    assert "runs=finished" in links["See why finished forgot"].query_string
