"""The admin console in a real headless Chromium (Debian's `chromium` and `chromedriver`, driven by
Selenium) against the real server: a wrong key sees nothing; the right key registers a request through
the form, watches it become active and its evidence arrive, opens the evidence and purges the request.

`UNLEARND_CONSOLE_SCREENSHOT=PATH` saves the request page (the README's picture is made that way)."""

from __future__ import annotations

import os
import shutil
import time

import httpx
import pytest

from tests.integration.conftest import ADMIN_KEY

pytestmark = pytest.mark.integration

NAME = "Quillon Varga-Esterhazy"
QA = [
    f"Where was {NAME} born? | {NAME} was born in Szeged in 1971.",
    f"What did {NAME}'s mother do? | {NAME}'s mother was a glassblower in Pecs.",
    f"Which prize did {NAME} win? | {NAME} won the Ambrose Lantern Prize for poetry.",
]


def _chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not browser or not driver:
        pytest.fail("Debian's chromium and chromium-driver are needed (scripts/system_packages.sh installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture(scope="module")
def browser():
    driver = _chromium()
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def _wait(condition, timeout_s: float, what: str):
    """`condition()`'s first true value; the console redraws its tables every 3 s, so an element found a
    moment ago may be gone: that is tried again."""
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            value = condition()
        except StaleElementReferenceException:
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _log_in(browser, url: str, key: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(url + "/admin")
    field = browser.find_element(By.ID, "admin-key")
    field.send_keys(key)
    browser.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()


def test_a_wrong_key_sees_nothing(browser, unlearnd_server, admin):
    from selenium.webdriver.common.by import By

    name = "Odile Fenwick-Marr"
    body = {"name": name, "method": "refuse", "forget": [{"question": f"Who is {name}?", "answer": "A chemist."}]}
    created = httpx.post(unlearnd_server.url + "/v1/unlearning/requests", headers=admin, json=body, timeout=60)
    try:
        _log_in(browser, unlearnd_server.url, "not-the-key")
        error = _wait(lambda: browser.find_element(By.ID, "login-error").text, 10, "the login error")
        assert "refused" in error
        assert not browser.find_element(By.ID, "app").is_displayed()
        assert name not in browser.page_source and created.json()["id"] not in browser.page_source
        assert "not-the-key" not in browser.current_url
        stored = browser.execute_script("return [localStorage.length, sessionStorage.length, document.cookie]")
        assert stored == [0, 0, ""]
    finally:
        httpx.delete(
            f"{unlearnd_server.url}/v1/unlearning/requests/{created.json()['id']}?purge=true", headers=admin, timeout=60
        )


def test_register_watch_it_become_active_open_its_evidence_and_purge(browser, unlearnd_server, admin):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _log_in(browser, unlearnd_server.url, ADMIN_KEY)
    _wait(lambda: browser.find_element(By.ID, "app").is_displayed(), 15, "the console after logging in")
    assert ADMIN_KEY not in browser.current_url
    browser.find_element(By.ID, "reg-name").send_keys(NAME)
    Select(browser.find_element(By.ID, "reg-method")).select_by_value("refuse")
    browser.find_element(By.ID, "reg-qa").send_keys("\n".join(QA))
    browser.find_element(By.CSS_SELECTOR, "#register-form button[type=submit]").click()
    message = _wait(lambda: browser.find_element(By.ID, "register-message").text, 60, "the registration message")
    assert message.startswith("Registered fr-"), message
    request_id = message.split()[1]

    def row_cells():  # read in one script: the table may be redrawn between two calls
        script = "const r = document.querySelector(`#requests tbody tr[data-id='${arguments[0]}']`);"
        return browser.execute_script(script + "return r ? [...r.cells].map((c) => c.textContent) : null;", request_id)

    _wait(lambda: (row_cells() or [""] * 3)[2] == "active", 300, "status active in the list")
    # the worker runs batteries one after another: those of requests other tests registered may come first
    verdict = _wait(lambda: (row_cells() or [""] * 6)[5] in ("passing", "failing") and row_cells()[5], 600, "evidence")
    live = browser.find_element(By.ID, "live-numbers").text
    assert "Detector latency" in live and "Active forget requests" in live

    _wait(lambda: browser.find_element(By.LINK_TEXT, NAME).click() or True, 15, "the request's link")
    _wait(lambda: browser.find_element(By.ID, "detail-view").is_displayed(), 15, "the request page")
    _wait(lambda: browser.find_element(By.ID, "evidence-table").is_displayed(), 30, "the evidence table")
    forms = browser.execute_script(
        "return [...document.querySelectorAll('#evidence-table tbody tr')].map((r) => r.cells[0].textContent)"
    )
    assert "direct" in forms and "description" in forms
    assert "Controls untouched" in browser.find_element(By.ID, "evidence-controls").text
    assert verdict in browser.find_element(By.ID, "evidence-status").text
    plot = _wait(lambda: browser.find_element(By.ID, "evidence-plot"), 30, "the plot")
    _wait(lambda: browser.execute_script("return arguments[0].naturalWidth", plot) > 0, 30, "the plot to load")
    history = browser.find_element(By.ID, "history").text
    assert "register" in history and "evidence" in history
    wide = browser.execute_script(
        "return [...document.querySelectorAll('#app *')].filter((e) => e.getBoundingClientRect().right > "
        "document.documentElement.clientWidth + 1).map((e) => e.tagName + '#' + e.id).slice(0, 5)"
    )
    assert not wide, f"the page scrolls sideways: {wide}"
    shot = os.environ.get("UNLEARND_CONSOLE_SCREENSHOT")
    if shot:
        browser.save_screenshot(shot)

    browser.find_element(By.ID, "act-purge").click()
    dialog = _wait(lambda: browser.find_element(By.ID, "confirm"), 10, "the confirmation")
    assert dialog.is_displayed() and "Purge" in dialog.text
    browser.find_element(By.ID, "confirm-ok").click()
    _wait(lambda: browser.find_element(By.ID, "list-view").is_displayed(), 30, "the list after the purge")
    _wait(lambda: row_cells() is None, 30, "the purged row to go")
    gone = httpx.get(f"{unlearnd_server.url}/v1/unlearning/requests/{request_id}", headers=admin, timeout=30)
    assert gone.status_code == 404
    evidence = httpx.get(f"{unlearnd_server.url}/v1/unlearning/requests/{request_id}/evidence", headers=admin)
    assert evidence.status_code == 404  # the probes and replies went with it
