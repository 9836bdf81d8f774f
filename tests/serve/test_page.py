"""The chat page in real headless chromium (selenium + Debian's chromedriver) against a live server:
it loads, takes the API key, lists the models, sends a message and streams the answer into the
page; copy and reset work. Screenshots (phone-sized) are saved under the test's tmp dir."""

from __future__ import annotations

import os
import shutil

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait
from serve_helpers import FINAL, KEY

pytestmark = pytest.mark.slow


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 "--window-size=412,915",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    # the suite runs with OpenBLAS in LD_PRELOAD (conftest.py); chromium's renderers crash with it
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    service = webdriver.ChromeService(shutil.which("chromedriver"), env=env)
    driver = webdriver.Chrome(service=service, options=options)
    yield driver
    driver.quit()


def test_the_page_streams_an_answer(browser, scripted_server, scripted_mlx, tmp_path):
    wait = WebDriverWait(browser, 60)
    browser.get(scripted_server.url + "/")
    assert browser.title == "Relief assistant"
    wait.until(lambda d: "API key" in d.find_element(By.ID, "status").text)  # the server wants a key: it says so
    key = browser.find_element(By.ID, "key")
    assert key.is_displayed()  # the settings opened on their own
    key.send_keys(KEY)
    browser.find_element(By.ID, "system").send_keys("Answer field teams briefly.")
    browser.find_element(By.ID, "input").click()  # leaves the key field: the page lists the models
    wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) == 2)
    models = Select(browser.find_element(By.ID, "model"))
    assert [o.text for o in models.options] == [str(scripted_mlx), "scramble"]
    assert browser.find_element(By.ID, "status").text == ""

    browser.find_element(By.ID, "input").send_keys("Where can we get clean water?")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .answer")
               and d.find_element(By.CSS_SELECTOR, ".msg.assistant .answer").text == FINAL)
    wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())
    user = browser.find_element(By.CSS_SELECTOR, ".msg.user").text
    assert "Where can we get clean water?" in user
    assert "tokens" in browser.find_element(By.CSS_SELECTOR, ".msg.assistant .meta").text
    shot = tmp_path / "page-answer.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot -> {shot}")

    # a second turn sends the history back; the server answers again (its prompt cache reused)
    before = scripted_server.health()["counters"]["cached_tokens"]
    browser.find_element(By.ID, "input").send_keys("And for cooking?\n")  # Enter sends
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant .answer")) == 2
               and d.find_elements(By.CSS_SELECTOR, ".msg.assistant .answer")[1].text == FINAL)
    wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())  # the stream ended: the counters are in
    assert scripted_server.health()["counters"]["cached_tokens"] > before
    browser.find_element(By.ID, "reset").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
    browser.find_element(By.ID, "show-reasoning").click()
    assert "show-reasoning" in browser.find_element(By.TAG_NAME, "body").get_attribute("class")
