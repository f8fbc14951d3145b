"""The app command opens a page that says what is here and what is coming."""

from streamlit.testing.v1 import AppTest

from spider.methods import available_methods


def test_page_lists_every_registered_method():
    app = AppTest.from_file("../../app/streamlit_app.py", default_timeout=60).run()
    assert not app.exception
    assert app.title[0].value == "Spiderscope"
    table = app.table[0].value
    assert sorted(table["method"]) == available_methods()
    assert all(text for text in table["what it does"])
