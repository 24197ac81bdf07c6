"""The page streams answers (real headless Chromium via Playwright): the sources and their priors
show before the answer, the answer's text grows token by token as the events arrive, and the
posterior weights replace the priors at the end; rag-sequence says it is scoring candidates and
shows the winner whole."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("Chromium is not installed (apt-get install chromium)", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytest.importorskip("uvicorn")

from crossmodal_rag.testing import make_tiny_causal_lm
from crossmodal_rag.web import WebSettings, create_app
from tests.servers import serve_in_thread

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN_DELAY_S = 0.08  # the generator is slowed so that tokens arrive visibly apart

# Records, in the page, every state of the answer and when the sources first appeared.
RECORDER = """
window.__answers = []; window.__sourcesAt = null; window.__statuses = [];
new MutationObserver(() => {
  const a = document.getElementById('answer'), s = document.getElementById('sources');
  const st = document.getElementById('ask-status');
  if (!a) return;
  const text = a.textContent;
  if (window.__answers[window.__answers.length - 1] !== text) window.__answers.push(text);
  if (window.__sourcesAt === null && s && s.children.length) window.__sourcesAt = window.__answers.length;
  if (st && window.__statuses[window.__statuses.length - 1] !== st.textContent) window.__statuses.push(st.textContent);
}).observe(document, {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, sample_collection: Path):
    coll = tmp_path_factory.mktemp("stream") / "coll"
    shutil.copytree(sample_collection, coll, ignore=shutil.ignore_patterns(".lock"))
    lm = make_tiny_causal_lm(tmp_path_factory.mktemp("lm") / "lm", seed=2)  # answers with many tokens
    app = create_app(WebSettings(collection=str(coll), generator=str(lm), max_new_tokens=12,
                                 thumbnail_dir=str(tmp_path_factory.mktemp("thumbs"))))
    with serve_in_thread(app, log_level="warning") as port:
        st = app.state.web
        st.generator.load()
        real_stream = st.generator.stream

        class Slowed:  # the real generator's text stream, each piece a little later
            def __init__(self, inner) -> None:
                self.inner = inner

            def __iter__(self):
                for piece in self.inner:
                    time.sleep(TOKEN_DELAY_S)
                    yield piece

            def __getattr__(self, name: str):
                return getattr(self.inner, name)

        st.generator.stream = lambda *args, **kwargs: Slowed(real_stream(*args, **kwargs))
        yield f"http://127.0.0.1:{port}"


def _wait_for(page, expression: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not page.evaluate(expression):
        assert time.time() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.05)


def _ask(page, question: str, mode: str) -> None:
    page.evaluate("window.__answers = []; window.__sourcesAt = null; window.__statuses = []")
    page.select_option("#mode", mode)
    page.fill("#question", question)
    page.click("#ask-btn")
    _wait_for(page, "document.getElementById('ask-status').textContent.startsWith('Answered in') || "
                    "document.getElementById('ask-status').classList.contains('error')")


def test_page_streams_the_answer(server: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        errors: list[str] = []
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.add_init_script(RECORDER)
        page.goto(server + "/")
        _wait_for(page, "document.getElementById('stats').textContent.includes('images')")

        _ask(page, "what is in the pictures?", "concat")
        answers = page.evaluate("window.__answers")
        final = page.text_content("#answer")
        assert "error" not in (page.get_attribute("#ask-status", "class") or ""), page.text_content("#ask-status")
        growing = [a for a in answers if a and final.startswith(a) and a != final]
        assert len(growing) >= 3, answers  # the text grew piece by piece before it was complete
        assert page.evaluate("window.__sourcesAt") is not None
        assert page.evaluate("window.__sourcesAt") <= answers.index(growing[0]) + 1  # sources first
        assert any(s.startswith("Generating (concat)") for s in page.evaluate("window.__statuses"))
        sources = page.query_selector_all("#sources li")
        weights = [float(s.text_content().split("weight")[1].split("%")[0]) for s in sources]
        assert sum(weights) == pytest.approx(100, abs=0.5)  # posteriors replaced the priors
        page.screenshot(path=str(ARTIFACTS / "ask-streamed.png"), full_page=True)

        _ask(page, "what is in the pictures?", "rag-sequence")
        statuses = page.evaluate("window.__statuses")
        assert any("Scoring candidates (rag-sequence)" in s for s in statuses), statuses
        answers = [a for a in page.evaluate("window.__answers") if a]
        final = page.text_content("#answer")
        assert all(a == final for a in answers), answers  # the winner arrives whole, once scored
        browser.close()
    assert not errors, errors
