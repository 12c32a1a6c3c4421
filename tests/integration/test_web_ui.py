"""The web UI in a real browser (Debian's Chromium, driven by Playwright) against a real
control plane, monitor, agent, database, broker and engine. Each page's screenshot is saved
under ``test-artifacts/screenshots``."""

from __future__ import annotations

import re
import shutil
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from dispatcher.settings import ImageNames
from dispatcher.states import RunState
from dispatcher.store import Database
from tests.integration.conftest import Stack
from tests.integration.test_dispatch import wait_for_state
from tests.integration.test_operators import dispatcher_cli
from tests.integration.test_web_api import token
from tests.support import eventually

SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
pytestmark = pytest.mark.timeout(600)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed (compose/setup-host.sh installs it on Debian)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        yield launched
        await launched.close()


async def shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


async def sign_in(page: Page, ui: str, secret: str) -> None:
    await page.goto(f"{ui}/runs")
    await expect(page).to_have_url(re.compile(r"/ui/login"))  # not signed in yet
    await page.fill("#token", "hdw_wrong")
    await page.click("button[type=submit]")
    await expect(page.locator(".error")).to_contain_text("unknown or revoked")
    await page.fill("#token", secret)
    await shot(page, "sign-in")
    await page.click("button[type=submit]")
    await expect(page).to_have_url(re.compile(r"/ui/runs$"))


async def test_an_operator_launches_follows_and_cancels_runs_and_sees_an_agent_lost(
    stack: Stack, store: Database, images: ImageNames, browser: Browser
) -> None:
    await stack.start_control_plane()
    await stack.start_monitor()
    agent = await stack.start_agent(0, extra=("--location-check-interval", "0.5"))
    _, api = await stack.start_web()
    ui = api.removesuffix("/api/v1") + "/ui"
    location = f"ex-{stack.unique}"
    added = await dispatcher_cli(
        stack,
        "locations",
        "add",
        location,
        "--image",
        images.example_location,
        "--queue",
        stack.queue,
    )
    assert added.returncode == 0, added.stderr

    async def loaded() -> bool:
        return (await store.locations.get(location)).status == "LOADED"

    await eventually(loaded, 90, what="the example location LOADED")
    # Runs of the location wait until this limit is raised: their QUEUED state can be seen.
    held = await dispatcher_cli(stack, "limits", "set", f"location:{location}", "0")
    assert held.returncode == 0, held.stderr

    context = await browser.new_context()
    watcher = await context.new_page()
    await sign_in(watcher, ui, await token(stack, "operator", "operate"))
    await watcher.evaluate("window.notReloaded = true")

    # Launch a job from its form, generated from the job's config schema; a bad value is
    # answered next to its field.
    launcher = await context.new_page()
    await launcher.goto(f"{ui}/locations")
    form = launcher.locator("form.launch[data-job=count]")
    await form.locator("input[name=to]").fill("0")  # the schema's minimum is 1
    await form.locator("button[type=submit]").click()
    await expect(form.locator(".field-error[data-field=to]")).to_contain_text(
        "config.to must be at least 1"
    )
    await shot(launcher, "locations")
    await form.locator("input[name=to]").fill("3")
    await form.locator("input[name=pause_s]").fill("1")
    await form.locator("button[type=submit]").click()
    await expect(launcher).to_have_url(re.compile(r"/ui/runs/[0-9a-f-]{36}$"))
    run_id = uuid.UUID(launcher.url.rsplit("/", 1)[1])

    # The runs list, never reloaded, shows the run QUEUED, then STARTED, then SUCCESS.
    row = watcher.locator(f"tr[data-run-id='{run_id}'] .state")
    await expect(row).to_have_text("QUEUED", timeout=30_000)
    await expect(watcher.locator(f"tr[data-run-id='{run_id}']")).to_contain_text(
        f"limit location:{location}"
    )
    await shot(watcher, "runs-waiting")
    raised = await dispatcher_cli(stack, "limits", "set", f"location:{location}", "5")
    assert raised.returncode == 0, raised.stderr
    await expect(row).to_have_text("STARTED", timeout=60_000)
    await expect(row).to_have_text("SUCCESS", timeout=60_000)
    assert await watcher.evaluate("window.notReloaded") is True
    await shot(watcher, "runs")

    # The run's page: its output, its steps, its timeline, its metadata.
    await launcher.reload()
    await expect(launcher.locator("#output")).to_contain_text("1\n2\n3")
    for step in ("count-1", "count-2", "count-3"):
        await expect(launcher.locator("#steps")).to_contain_text(step)
    await expect(launcher.locator("#metadata")).to_contain_text("counted")
    await expect(launcher.locator("#timeline svg rect.seg-started")).to_have_count(1)
    await shot(launcher, "run")

    # A long run, canceled from its page.
    async with stack.client() as client:
        long = await client.submit(stack.run_image, ["sleep", "300"], queue=stack.queue)
    await wait_for_state(store, long, RunState.STARTED, timeout=60)
    page = await context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    await page.goto(f"{ui}/runs/{long}")
    await page.click("#cancel")
    await expect(page.locator("dd[data-field=state] .state")).to_have_text(
        "CANCELED", timeout=60_000
    )
    await shot(page, "run-canceled")
    assert (await store.runs.get(long)).state == RunState.CANCELED

    # The other pages.
    for name in ("overview", "alerts", "dead-letters"):
        await page.goto(f"{ui}/{name}")
        await expect(page.locator("#content")).not_to_contain_text("Loading")
        await shot(page, name)

    # The agent, SIGKILLed, turns LOST on the agents page.
    await page.goto(f"{ui}/agents")
    status = page.locator(f"tr[data-agent-id='{stack.agent_id(0)}'] .state")
    await expect(status).to_have_text("ALIVE", timeout=30_000)
    await shot(page, "agents")
    agent.signal(signal.SIGKILL)
    await expect(status).to_have_text("LOST", timeout=60_000)
    await shot(page, "agents-lost")
    await context.close()
