"""08_report/report.html in a real headless browser (Debian's chromium and chromedriver, driven by selenium):
it loads with no console error, lists pairs of every pruned corpus, sorts and searches, and shows a corpus line
holding a <script> tag as text without running it. scripts/test.sh installs chromium where it can; elsewhere
these tests are skipped, saying why."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import TINY
from mtprune.config import load_config
from mtprune.layout import RunLayout

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
PAGE_LIMIT = 1_000_000  # bytes: the demo's page (a bounded sample per corpus, whatever the corpus size)


@pytest.fixture(scope="module")
def browser():  # noqa: ANN201
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver; "
                    "scripts/test.sh does it when run as root)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[dev])")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _open(driver, page: Path) -> list[dict]:  # noqa: ANN001
    driver.get(page.resolve().as_uri())
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


def _rows(driver) -> list[list[str]]:  # noqa: ANN001
    return [[td.text for td in tr.find_elements("tag name", "td")]
            for tr in driver.find_elements("css selector", "#rows tr")]


@pytest.mark.slow
def test_the_report_page_loads_lists_every_corpus_and_sorts_and_searches(tiny_swept: tuple[Path, str],
                                                                         browser) -> None:  # noqa: ANN001
    from selenium.webdriver.support.ui import Select

    page = RunLayout(tiny_swept[0]).report_file("report.html")
    assert 0 < page.stat().st_size < PAGE_LIMIT
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # nothing fetched from a network
    assert _open(browser, page) == []  # no console error or warning
    select = Select(browser.find_element("id", "corpus"))
    names = [o.get_attribute("value") for o in select.options]
    assert names == ["el2n-high-0.2", "random-0.2"]
    for name in names:
        select.select_by_value(name)
        rows = _rows(browser)
        assert {r[0] for r in rows} == {"dropped", "kept"} and len(rows) == 80, name
    heads = [th.text for th in browser.find_elements("css selector", "#head th")]
    el2n = heads.index("el2n")
    browser.find_elements("css selector", "#head th")[el2n].click()
    up = [float(r[el2n]) for r in _rows(browser)]
    assert up == sorted(up) and up[0] < up[-1]
    browser.find_elements("css selector", "#head th")[el2n].click()
    down = [float(r[el2n]) for r in _rows(browser)]
    assert down == sorted(down, reverse=True)
    one = _rows(browser)[5][1]
    browser.find_element("id", "search").send_keys(one)
    assert [r[1] for r in _rows(browser)] == [one]
    assert browser.find_element("id", "count").text == "1 of 80 pairs shown"
    Select(browser.find_element("id", "which")).select_by_value("kept")
    assert all(r[0] == "kept" for r in _rows(browser))


@pytest.mark.slow
def test_a_corpus_line_holding_a_script_is_shown_as_text_and_never_runs(tiny_swept: tuple[Path, str], tmp_path: Path,
                                                                        browser) -> None:  # noqa: ANN001
    """Every English training line of a copy of the run becomes markup that would run if the page inserted it as
    HTML (a closing script tag, a script, an image whose error handler runs code); the page is written again."""
    import pandas as pd

    from mtprune.stages.report import noise_labels, results_rows
    from mtprune.stages.report_html import write_page

    run = tmp_path / "run"
    shutil.copytree(tiny_swept[0], run)
    L = RunLayout(run)
    evil = '</script><script>window.pwned=1</script><img src=x onerror="window.pwned=2"> &amp; "q"'
    for pair in ("de-en", "en-es"):
        f = L.split_file(pair, "train", "en")
        f.write_text("".join(f"{evil} {line}\n" for line in f.read_text().splitlines()))
    cfg = load_config(TINY, run_dir=str(run))
    df = pd.read_parquet(L.scores)
    page = tmp_path / "report.html"
    write_page(cfg, L, results_rows(cfg, L), df, noise_labels(cfg, L), None, page)
    assert "<script>window.pwned" not in page.read_text()
    assert _open(browser, page) == []
    assert browser.execute_script("return window.pwned === undefined")
    shown = [r[2] for r in _rows(browser)] + [r[3] for r in _rows(browser)]
    assert any(s.startswith(evil) for s in shown)  # the line, character for character, as text


@pytest.mark.parametrize("n", [100, 1_000_000])
def test_the_page_shows_a_bounded_seeded_sample_whatever_the_corpus_size(n: int) -> None:
    """At most SAMPLE dropped and SAMPLE kept pairs per corpus (so a 1M-pair run's page is as large as the demo's
    per corpus), the same draw every time."""
    from mtprune.stages.report_html import SAMPLE, sample_rows

    d, k = sample_rows(n // 5, n - n // 5, seed=1)
    assert len(d) == min(SAMPLE, n // 5) and len(k) == SAMPLE
    assert (d < n // 5).all() and (k < n - n // 5).all() and len(set(d)) == len(d)
    again = sample_rows(n // 5, n - n // 5, seed=1)
    assert d.tolist() == again[0].tolist() and k.tolist() == again[1].tolist()
