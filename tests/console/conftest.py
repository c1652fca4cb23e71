"""The console's fixtures: one headless Debian chromium per test module, a console on a real site and store."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from agent.console.auth import hash_password
from agent.console.server import Console
from agent.console.state import ConsoleState

CHROMIUM = Path(os.environ.get("EDGE_AGENT_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Accounts every console test has: name -> (password, role).
ACCOUNTS = {
    "ana": ("ana's long password", "operator"),
    "bo": ("bo's long password", "operator"),
    "sam": ("sam's long password", "supervisor"),
    "ian": ("ian's long password", "installer"),
}


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, headless, driven by Playwright (no browser download: the apt package)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def add_accounts(state: ConsoleState) -> None:
    for name, (password, role) in ACCOUNTS.items():
        state.add_operator(name, hash_password(password), role, time.time())


@pytest.fixture
def console(site, receiver):
    """A console on the site's store (beside the running receiver), on a free loopback port."""
    with Console(site.receiver_config, listen="127.0.0.1:0") as running:
        add_accounts(running.state)
        running.start()
        yield running


def log_in(browser, console: Console, name: str, password: str | None = None):
    """A fresh browser context (its own cookies) logged in as ``name``: its page, on the queue."""
    page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
    page.goto(console.url + "login")
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", ACCOUNTS[name][0] if password is None else password)
    page.click("button[type=submit]")
    return page


def live(page) -> None:
    """Wait until the page's event stream is connected (the dot in the header turns green)."""
    page.wait_for_selector("#link-state.up", timeout=10000)


def csrf_of(page) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page.content()).group(1)
