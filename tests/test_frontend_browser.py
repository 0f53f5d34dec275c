"""The frontend page in a real headless browser: Debian's Chromium driven by
Playwright's Python client (no browser download), in front of a real
`segrec serve` over the tiny export. Pick a user, see titled results, move the
beta slider, type a profile with a liked item, see the server's error for a
bad input and a server that is down, and take screenshots."""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import threading
import time

import pytest
from test_frontend import dataset_dir_of, export_dir, served  # noqa: F401  (module fixtures)

from serving.frontend import web as frontend
from serving.server.launch import free_port

CHROMIUM = "/usr/bin/chromium"
# No sandbox (containers), no GPU, and nothing that reaches out to the network.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WAIT_MS = 20_000

pytestmark = pytest.mark.integration


def _need_chromium() -> None:
    if os.path.exists(CHROMIUM):
        return
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing under CI; `make browser` installs Debian's chromium")
    pytest.skip(f"{CHROMIUM} is missing (run `make browser` to install Debian's chromium)")


@contextlib.contextmanager
def running_frontend(config: frontend.FrontendConfig):
    """The app under uvicorn in a thread on a free port; yields its URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(frontend.create_app(config), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, name="frontend", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the frontend did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def browser():
    _need_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def url(served, export_dir):  # noqa: F811
    config = frontend.FrontendConfig(target=served["target"], dataset_dir=dataset_dir_of(export_dir),
                                     model_base_path=served["base"], timeout=10)
    with running_frontend(config) as address:
        yield address


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def result_rows(page) -> list:
    """(item id, title, score) of every results row."""
    rows = page.locator("#items tbody tr")
    return [(rows.nth(i).locator("td.id").inner_text(), rows.nth(i).locator("td.title").inner_text(),
             rows.nth(i).locator("td.num").inner_text()) for i in range(rows.count())]


def assert_png(path: pathlib.Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000, f"{path} is not a PNG screenshot"


def test_pick_a_user_see_results_move_beta_and_see_a_server_error(page, url, tmp_path):
    import httpx

    users = httpx.get(f"{url}/api/users").json()["users"]
    user = next(u for u in users if u["history_length"] >= 2)
    page.goto(url)
    page.wait_for_selector("#health.ok", timeout=WAIT_MS)
    assert re.match(r"segrec v1 · 127\.0\.0\.1:\d+", page.inner_text("#health"))
    page.wait_for_selector(f"#user-select option[value='{user['user_id']}']", state="attached")
    page.select_option("#user-select", user["user_id"])
    page.click("#submit")
    page.wait_for_selector("#items tbody tr", timeout=WAIT_MS)
    first = result_rows(page)
    assert len(first) == 10
    assert all(title and title != "(no title)" for _, title, _ in first)
    assert page.inner_text("#segment .segment-label").strip()
    assert page.locator("#segment .profile dt").count() >= 1  # size, top categories, ...
    history = page.locator("#history li").all_text_contents()  # inside a closed <details>
    assert len(history) == user["history_length"]
    assert not {i for i, _, _ in first} & {h.rsplit(" · ", 1)[1] for h in history}
    assert page.locator("#error").is_hidden()

    page.locator("#beta").fill("1")  # sets the value and fires input + change: the page re-queries
    page.wait_for_function("document.getElementById('results-meta').textContent.includes('beta 1.00')",
                           timeout=WAIT_MS)
    assert result_rows(page) != first
    shot = tmp_path / "results.png"
    page.screenshot(path=str(shot), full_page=True)
    assert_png(shot)

    page.fill("#k", "0")
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])", timeout=WAIT_MS)
    text = page.inner_text("#error")
    assert "Recommend failed: HTTP 400 · INVALID_ARGUMENT (from the model server)" in text
    assert "inputs.k: 0" in text and "out of range" in text
    shot = tmp_path / "error.png"
    page.screenshot(path=str(shot), full_page=True)
    assert_png(shot)


def test_typed_profile_with_a_liked_item(page, url):
    import httpx

    item = httpx.get(f"{url}/api/items", params={"q": "a"}).json()["items"][0]
    page.goto(url)
    page.wait_for_selector("#health.ok", timeout=WAIT_MS)
    page.click("#tab-typed")
    page.fill("#profile", "no colon here")
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])")
    assert "Recommend failed: BAD_PROFILE (on this page)" in page.inner_text("#error")
    assert 'write "no colon here" as name: value' in page.inner_text("#error")

    page.fill("#profile", "occupation: engineer\nage: 31")
    page.fill("#item-search", "a")  # many titles match: the page asks to pick one
    page.press("#item-search", "Enter")
    page.wait_for_function("document.getElementById('error').textContent.includes('AMBIGUOUS')")
    assert "pick one from the list" in page.inner_text("#error")
    assert page.locator("#liked li").count() == 0
    page.fill("#item-search", item["item_id"])
    page.wait_for_selector(f"#item-options option[value='{item['item_id']}']", state="attached")
    page.press("#item-search", "Enter")
    assert page.inner_text("#liked li").startswith(item["title"])
    page.click("#submit")
    page.wait_for_selector("#items tbody tr", timeout=WAIT_MS)
    assert page.locator("#error").is_hidden()
    assert item["item_id"] not in [i for i, _, _ in result_rows(page)]
    assert page.text_content("#user-text") == "user: age 31, occupation engineer."  # --text-history 0: no titles


def test_a_server_that_is_down_is_shown_on_the_page(browser, tmp_path):
    config = frontend.FrontendConfig(target=f"127.0.0.1:{free_port()}", timeout=2, retries=0)
    context = browser.new_context()
    try:
        page = context.new_page()
        with running_frontend(config) as address:
            page.goto(address)
            page.wait_for_selector("#health.bad", timeout=WAIT_MS)
            assert page.inner_text("#health") == "model server: UNAVAILABLE"
            assert "Health check failed: HTTP 503 · UNAVAILABLE (from the model server)" in page.inner_text("#error")
            # Without a dataset the page opens on the typed profile; recommending fails the same way.
            page.fill("#profile", "age: 31")
            page.click("#submit")
            page.wait_for_function("document.getElementById('error').textContent"
                                   ".includes('Recommend failed: HTTP 503 · UNAVAILABLE')", timeout=WAIT_MS)
            assert "failed to connect" in page.inner_text("#error .message")  # the gRPC message itself
            shot = tmp_path / "down.png"
            page.screenshot(path=str(shot))
            assert_png(shot)
    finally:
        context.close()
