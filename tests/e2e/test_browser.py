"""The page in real headless Chromium (Debian's chromium, driven by Playwright): type a query,
upload an image, ask a question, check what is rendered. Screenshots go to test-artifacts/."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("Chromium is not installed (apt-get install chromium)", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
uvicorn = pytest.importorskip("uvicorn")

from crossmodal_rag.testing import make_tiny_t5
from crossmodal_rag.web import WebSettings, create_app
from tests.servers import serve_in_thread

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]



@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, sample_collection: Path):
    coll = tmp_path_factory.mktemp("browser") / "coll"
    shutil.copytree(sample_collection, coll, ignore=shutil.ignore_patterns(".lock"))
    t5 = make_tiny_t5(tmp_path_factory.mktemp("t5") / "t5")
    app = create_app(WebSettings(collection=str(coll), generator=str(t5), max_new_tokens=4,
                                 thumbnail_dir=str(tmp_path_factory.mktemp("thumbs"))))
    with serve_in_thread(app, log_level="warning") as port:
        yield f"http://127.0.0.1:{port}"


def _wait_for(page, expression: str, timeout: float = 60.0) -> None:
    """Poll ``expression`` through the DevTools protocol (``wait_for_function`` evaluates a string in
    the page, which the page's Content Security Policy forbids, as it should)."""
    deadline = time.time() + timeout
    while not page.evaluate(expression):
        assert time.time() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.05)


def test_search_upload_and_ask_in_chromium(server: str, sample_dir: Path) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        failed: list[str] = []
        page.on("requestfailed", lambda req: failed.append(req.url))
        console_errors: list[str] = []  # a Content Security Policy violation is logged here
        page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: console_errors.append(str(exc)))
        page.on("response", lambda resp: console_errors.append(f"HTTP {resp.status} {resp.url}")
                if resp.status >= 400 else None)
        page.add_init_script("window.__csp = []; document.addEventListener('securitypolicyviolation', "
                             "e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI))")
        outside: list[str] = []
        page.on("request", lambda req: None if req.url.startswith(server) or req.url.startswith("blob:")
                else outside.append(req.url))
        page.goto(server + "/")
        _wait_for(page, "document.getElementById('stats').textContent.includes('images')")
        assert "15 images" in page.text_content("#stats")

        # keyboard only: focus the query box, type, press Enter
        page.keyboard.press("Tab")
        page.focus("#q")
        page.keyboard.type("a cat looking at the camera")
        page.keyboard.press("Enter")
        page.wait_for_selector("#results li.card")
        _wait_for(page, "document.getElementById('search-status').textContent.includes('results for')")
        cards = page.query_selector_all("#results li.card")
        assert len(cards) == 12
        scores = [float(c.query_selector(".score").text_content().split("·")[1]) for c in cards]
        assert scores == sorted(scores, reverse=True)
        _wait_for(page, "[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
        page.screenshot(path=str(ARTIFACTS / "search-text.png"), full_page=True)

        # upload an image through the file input (what the drop zone opens)
        page.set_input_files("#file", str(sample_dir / "cat.jpg"))
        _wait_for(page, "document.getElementById('search-status').textContent.includes('results for cat.jpg')")
        first = page.query_selector("#results li.card img")
        assert "cat" in (first.get_attribute("alt") or "") or "tabby" in (first.get_attribute("alt") or "")
        page.screenshot(path=str(ARTIFACTS / "search-image.png"), full_page=True)

        # ask, with the chosen image driving retrieval
        page.focus("#question")
        page.keyboard.type("What is the cat doing?")
        page.keyboard.press("Enter")
        page.wait_for_selector("#answer-panel:not([hidden])", timeout=60_000)
        _wait_for(page, "document.getElementById('ask-status').textContent.includes('Answered in')")  # streamed
        sources = page.query_selector_all("#sources li")
        assert len(sources) == 5
        weights = [float(s.text_content().split("weight")[1].split("%")[0]) for s in sources]
        assert sum(weights) == pytest.approx(100, abs=0.5)
        bars = page.eval_on_selector_all("#sources .bar", "els => els.map(e => e.getBoundingClientRect().width)")
        assert max(bars) > 2  # the weight bars are drawn (their width is set under the page's CSP)
        page.screenshot(path=str(ARTIFACTS / "ask.png"), full_page=True)

        # an error state: an empty question without an image
        page.uncheck("#use-image")
        page.fill("#question", "")
        page.click("#ask-btn")
        assert "Type a question" in page.text_content("#ask-status")
        violations = page.evaluate("window.__csp")
        browser.close()
    assert not violations, violations
    assert not console_errors, console_errors
    assert not failed, failed
    assert not outside, outside


def test_a_shared_address_sets_the_mode_and_searches(server: str) -> None:
    """/?q=...&mode=keyword: the page sets its mode selector from the address and searches; a
    search from the form writes its query and mode into the address (history)."""
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server + "/?q=tabby&mode=keyword")
        _wait_for(page, "document.getElementById('search-status').textContent.includes('results for')")
        assert page.input_value("#search-mode") == "keyword" and page.input_value("#q") == "tabby"
        assert "keyword: asked for" in page.text_content("#search-status")
        cards = page.query_selector_all("#results li.card")
        assert cards and all("tabby" in (c.query_selector("img").get_attribute("alt") or "") for c in cards)
        # the default mode, from the form: the address follows
        page.select_option("#search-mode", "auto")
        page.fill("#q", "a cup of espresso")
        page.click("#search-btn")
        _wait_for(page, "location.search.includes('mode=auto')")
        # the finished status ("N results for ..."), not the "Searching for ..." line shown meanwhile
        _wait_for(
            page,
            "(t => t.includes('espresso') && t.includes('results for'))"
            "(document.getElementById('search-status').textContent)",
        )
        assert "q=a+cup+of+espresso" in page.evaluate("location.search")
        assert "auto: " in page.text_content("#search-status")
        page.go_back()  # the shared address again: keyword mode, its query
        _wait_for(page, "document.getElementById('search-mode').value === 'keyword'")
        assert page.input_value("#q") == "tabby"
        browser.close()
    assert not errors, errors
