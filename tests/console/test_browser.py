"""The console in a real browser: headless Chromium from the Debian package (``/usr/bin/chromium``),
driven by Playwright for Python, against the real service and the emulators (``LocalStack``).

What a person sees: the table fills; a change made in the emulators shows without a reload; the
explanation names the rule; a dead letter shows the upstream's words and its retry works; the
console is not shown without signing in. Every wait is bounded; each test saves a screenshot
(to a temporary folder, or to ``CONSOLE_SCREENSHOT_DIR`` when set, which is how the README's
pictures under ``docs/`` are made).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Locator, Page, async_playwright, expect

from console.access import issue_link_ticket
from emulators.dataverse import DND
from service.stack import LocalStack
from tests.scenarios.conftest import START_SECONDS, make_agents, settle

# End to end (the emulators and the service, like tests/scenarios): CI runs them, the fast lane does not.
pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

CHROMIUM = "/usr/bin/chromium"
WAIT_MS = 15_000


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    chosen = os.environ.get("CONSOLE_SCREENSHOT_DIR")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("console-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    names = ["Alice Agent", "Bob Agent", "Carol Agent"]
    agents = [replace(a, name=n) for a, n in zip(make_agents(3), names, strict=True)]
    s = LocalStack(tmp_path_factory.mktemp("console-stack"), agents, overrides={"teams_write_hold_seconds": 0})
    async with asyncio.timeout(START_SECONDS):
        await s.start()
    await settle(s)
    try:
        yield s
    finally:
        async with asyncio.timeout(30):
            await s.stop()


@pytest.fixture(scope="module")
def chromium() -> str:
    """The Debian browser; missing is a failure, never a skip (CI installs it)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` (.ci/run does it)")
    return CHROMIUM


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser(chromium: str) -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            await b.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def page(browser: Browser, stack: LocalStack) -> AsyncIterator[Page]:
    """One signed-in page (the one-time link, as ``presence-sync console link`` prints it)."""
    context = await browser.new_context(viewport={"width": 1440, "height": 900})
    p = await context.new_page()
    ticket = await issue_link_ticket(stack.runtime.store)
    await p.goto(f"{stack.base_url}/console/link?ticket={ticket}")
    await expect(p).to_have_url(f"{stack.base_url}/console", timeout=WAIT_MS)
    try:
        yield p
    finally:
        await context.close()


def row(page: Page, stack: LocalStack, i: int) -> Locator:
    return page.locator(f"#agents tbody tr[data-id='{stack.agents[i].dynamics_id}']")


async def test_the_agents_table_fills(page: Page, stack: LocalStack, shots: Path):
    await expect(page.locator("#agents tbody tr")).to_have_count(3, timeout=WAIT_MS)
    await expect(page.locator("#count")).to_have_text("3 agent(s)")
    await expect(row(page, stack, 0)).to_contain_text("Alice Agent")
    await expect(row(page, stack, 0)).to_contain_text("Available")
    await expect(row(page, stack, 0)).to_contain_text("in sync")
    await expect(page.locator("#live")).to_have_text("live", timeout=WAIT_MS)
    await page.locator("#search").fill("carol")
    await expect(page.locator("#agents tbody tr")).to_have_count(1, timeout=WAIT_MS)
    await page.locator("#search").fill("")
    await expect(page.locator("#agents tbody tr")).to_have_count(3, timeout=WAIT_MS)
    await page.screenshot(path=str(shots / "agents.png"))


async def test_a_change_in_the_emulators_shows_without_a_reload(page: Page, stack: LocalStack, shots: Path):
    await page.evaluate("window.__notReloaded = true")
    alice = stack.agents[0]
    stack.graph.set_user_state(alice.entra_id, "Busy", "InAMeeting")
    alice_row = row(page, stack, 0)
    await expect(alice_row).to_contain_text("Busy/InAMeeting", timeout=WAIT_MS)
    await expect(alice_row.locator("td").nth(1).locator(".value")).to_have_text("Busy", timeout=WAIT_MS)
    await expect(alice_row).to_contain_text("override", timeout=WAIT_MS)
    assert await page.evaluate("window.__notReloaded === true"), "the page was reloaded"
    await page.screenshot(path=str(shots / "live-change.png"))


async def test_the_explanation_names_the_rule(page: Page, stack: LocalStack, shots: Path):
    await row(page, stack, 0).click()
    rule = page.locator("#rule")
    await expect(rule).to_contain_text("Rule 2: Teams override", timeout=WAIT_MS)
    await expect(rule).to_contain_text("Teams Busy/InAMeeting asks Busy over the agent's own Available")
    await expect(page.locator("#explanation")).to_contain_text("P, own Dynamics presence")
    await expect(page.locator("#timeline li").first).to_be_visible()
    await page.screenshot(path=str(shots / "explanation.png"))


async def test_a_dead_letter_shows_the_upstream_message_and_its_retry_works(page: Page, stack: LocalStack, shots: Path):
    bob = stack.agents[1]
    stack.dataverse.fail_next(1, 400, path="CCaaS_ModifyAgentPresence")
    stack.graph.set_user_state(bob.entra_id, "DoNotDisturb", "Presenting")
    await expect(row(page, stack, 1)).to_contain_text("dead letter", timeout=WAIT_MS)
    await page.locator("#tab-ops").click()
    dead = page.locator(f"#dead tbody tr:has-text('{bob.dynamics_id}')")
    await expect(dead).to_have_count(1, timeout=WAIT_MS)
    await expect(dead.locator("td.error")).not_to_be_empty()
    subscription = page.locator("#subscriptions tbody tr")
    await expect(subscription).to_have_count(1)
    await expect(subscription).to_contain_text("ago")  # the last Teams report for its agents
    # ... and the subscription's own last notification (Bob's Presenting came by one), which a sweep
    # cannot fake: a silent subscription shows here.
    await expect(page.locator("#subscriptions thead th").nth(5)).to_have_text("Last notification")
    await expect(subscription.locator("td").nth(5)).to_contain_text("ago", timeout=WAIT_MS)
    await page.screenshot(path=str(shots / "operations.png"), full_page=True)
    assert stack.dataverse.presence_of(bob.dynamics_id) != DND
    await dead.locator("button.retry").click()
    await expect(page.locator("#toast")).to_contain_text("queued again", timeout=WAIT_MS)
    assert await stack.until(lambda: stack.dataverse.presence_of(bob.dynamics_id) == DND, timeout=15), (
        "the retried write did not reach Dynamics"
    )
    await expect(dead).to_have_count(0, timeout=WAIT_MS)


async def test_the_console_is_not_shown_without_signing_in(browser: Browser, stack: LocalStack, shots: Path):
    context = await browser.new_context()
    try:
        p = await context.new_page()
        await p.goto(f"{stack.base_url}/console")
        await expect(p).to_have_url(f"{stack.base_url}/console/signin", timeout=WAIT_MS)
        await expect(p.locator("h1")).to_have_text("presence-sync console")
        await expect(p.locator("#agents")).to_have_count(0)
        await p.goto(f"{stack.base_url}/console/link?ticket=made-up")
        await expect(p.locator("body")).to_contain_text("unknown or was already used")
        await p.screenshot(path=str(shots / "signin.png"))
    finally:
        await context.close()
