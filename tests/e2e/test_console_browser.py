"""The console's pages in a real browser: Debian's chromium driven by Playwright.

Against `loratune up` with a tiny model: the projects list, one classification project's
launch dialog (the trials field's limits are the browser's own validity checks), a quick
launch of 20 real trials, the study followed live through its event stream to completion,
and the best trial's per-class table with the class left out by MIN_SAMPLES_PER_CLASS.
With LORATUNE_SCREENSHOTS=1 the dialog and the study page are saved under docs/console/.

Against a console with LORATUNE_AUTH_TOKEN set, in front of fake trainers: signing in,
the server's refusal shown in the dialog, a launch from the dialog, and cancelling.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.console_stack import TOKEN, ConsoleStack, console_stack
from tests.e2e.test_up_and_tune import OPTIMIZER, start_up, wait_serving
from tests.unit.trainer.conftest import build_tiny_qwen

CHROMIUM = os.environ.get("LORATUNE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "console"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

playwright_api = pytest.importorskip(
    "playwright.async_api", reason="playwright is not installed (the dev extra)"
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK),
        reason=f"no chromium at {CHROMIUM} (make browser, or apt-get install chromium)",
    ),
]


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[ConsoleStack]:
    async with console_stack(tmp_path / "stack", auth_token=TOKEN) as running:
        yield running


WORDS = ["good", "great", "bad", "awful"]
PROJECT = """
projects:
  - id: 7
    name: sentiment
    dataset:
      uri: {data}
      task_type: classification
      validation_fraction: 0.25
    base_model_name: {model}
    search_space:
      rank: [4]
      num_epochs: [1, 2]
      batch_size: [8]
      learning_rate: {{low: 0.0001, high: 0.01, log: true}}
    training: {{max_seq_length: 16}}
"""


@dataclass
class Up:
    """The console of a running `loratune up`, and its project's base model."""

    base: str
    model: Path


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    """`loratune up` with one project on a tiny Qwen3 model."""
    model = build_tiny_qwen(tmp_path / "tiny-qwen3")
    data = tmp_path / "sentiment.jsonl"
    # A word that says the class, a word that does not, and one label in five flipped: a
    # task the trials do not all solve, so their objectives differ.
    rows = [
        {
            "text": f"w{i % 7} {WORDS[i % 4]} {WORDS[(i * 3 + 1) % 4]}",
            "label": ("pos" if i % 4 < 2 else "neg") if i % 5 else ("neg" if i % 4 < 2 else "pos"),
        }
        for i in range(40)
    ]
    # Two rows of a class under MIN_SAMPLES_PER_CLASS: left out of training, and marked.
    rows += [{"text": "w1 good bad", "label": "mixed"}, {"text": "w2 bad good", "label": "mixed"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    projects = tmp_path / "projects.yaml"
    projects.write_text(PROJECT.format(data=data, model=model))
    up = start_up(
        tmp_path,
        extra_env={
            "LORATUNE_PROJECTS": str(projects),
            "MIN_SAMPLES_PER_CLASS": "3",
            # A judge model with credentials, for the dialog's list (no call reaches it).
            "GEMINI_API_KEY": "AIzaSy-console-browser-e2e",
        },
    )
    process = up.process
    base = f"http://127.0.0.1:{up.web}"
    try:
        wait_serving(up.address, OPTIMIZER, process, 90)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the console never answered"
            time.sleep(0.2)
        yield Up(base, model)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        print(up.log.read_text()[-20_000:])


@pytest.fixture
async def page(tmp_path: Path) -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1100, "height": 900},
        )
        try:
            yield context.pages[0] if context.pages else await context.new_page()
        finally:
            await context.close()


def _screenshot(name: str) -> Path | None:
    if os.environ.get("LORATUNE_SCREENSHOTS") != "1":
        return None
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS / name


async def test_a_quick_launch_on_loratune_up_is_followed_live_to_the_best_trials_evaluation(
    up: Up, page: Any
) -> None:
    expect = playwright_api.expect
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))

    # The projects list leads to the project.
    await page.goto(f"{up.base}/projects")
    await page.get_by_role("link", name="sentiment").click()
    await expect(page.locator("#title")).to_have_text("Project sentiment")
    await expect(page.locator("#quick-note")).to_contain_text("does not apply to classification")

    # The dialog: labelled fields, the project's base model, the judge models with credentials.
    await page.get_by_role("button", name="Configure fine-tuning").click()
    dialog = page.get_by_role("dialog", name="Configure fine-tuning")
    await expect(dialog).to_be_visible()
    await expect(page.get_by_label("Base model")).to_have_value(str(up.model))
    options = await page.locator("#judge-model option").all_text_contents()
    assert "gemini (default)" in options, options
    trials = page.get_by_label("Optimisation trials")
    for refused, flag in (("3", "rangeUnderflow"), ("101", "rangeOverflow")):
        await trials.fill(refused)
        assert await trials.evaluate(f"field => field.validity.{flag}")
        assert not await page.locator("#configure-form").evaluate("form => form.checkValidity()")
        # Start does not send it: the browser's own check stops the form.
        await dialog.get_by_role("button", name="Start").click()
        await expect(dialog).to_be_visible()
        assert "/projects/" in page.url
    await trials.fill("20")
    assert await page.locator("#configure-form").evaluate("form => form.checkValidity()")
    if (path := _screenshot("dialog.png")) is not None:
        await page.screenshot(path=str(path))
    await page.keyboard.press("Escape")
    await expect(dialog).to_be_hidden()

    # Quick launch: 20 real trials of the tiny model, without the judge, followed live.
    await page.get_by_role("button", name="Quick launch").click()
    await page.wait_for_url("**/studies/*/live")
    await page.evaluate("window.loadedOnce = true")
    state = page.locator("#study-state")
    await expect(page.locator("#running-trials")).to_be_visible(timeout=60_000)
    await expect(page.locator("#running-trials tbody tr").first).to_be_visible()
    await expect(state).to_have_text("COMPLETED", timeout=420_000)
    await expect(page.locator("#study-progress")).to_have_text("20 / 20")
    # Live, not reloaded: the mark set after the first load is still there.
    assert await page.evaluate("window.loadedOnce === true")
    # Each trial that ran has its row; repeats of a finished point (no job) are marked.
    assert await page.locator("#trials tbody tr:not(.reused)").count() == 20
    assert await page.locator("svg.chart circle").count() >= 1
    await expect(page.locator("#cancel-study")).to_be_hidden()

    # The best trial, as the summary names it, is the highlighted row; open its evaluation.
    best = (await page.locator("#study-best").text_content() or "").split("#")[-1].rstrip(")")
    best_row = page.locator("#trials tr.best")
    await expect(best_row.locator("td").first).to_have_text(best)
    await best_row.get_by_role("button").click()
    await expect(page.locator("#evaluation-title")).to_have_text(f"Evaluation of trial #{best}")
    per_class = page.locator("#per-class tbody tr")
    await expect(per_class).to_have_count(2)
    assert sorted(await page.locator("#per-class tbody tr td:first-child").all_text_contents()) == [
        "neg",
        "pos",
    ]
    await expect(page.locator("#excluded")).to_contain_text("mixed (2 train rows)")
    await expect(page.locator("#confusion")).to_be_visible()
    if (path := _screenshot("study.png")) is not None:
        await page.screenshot(path=str(path), full_page=True)
    assert not errors, errors


async def test_signing_in_launching_from_the_dialog_and_cancelling(
    stack: ConsoleStack, page: Any
) -> None:
    expect = playwright_api.expect
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))

    # With LORATUNE_AUTH_TOKEN set, the page asks for it first, then comes back.
    await page.goto(f"{stack.base}/projects/7")
    await page.wait_for_url(re.compile(r"/sign-in\?next="))
    await page.get_by_label("Access token").fill("not-the-token")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("alert")).to_have_text("That is not this console's access token.")
    await page.get_by_label("Access token").fill(TOKEN)
    await page.keyboard.press("Enter")
    await page.wait_for_url("**/projects/7")
    await expect(page.locator("#title")).to_have_text("Project sentiment")

    # What the browser lets through and the server refuses: its message, in the dialog.
    await page.get_by_role("button", name="Configure fine-tuning").click()
    dialog = page.get_by_role("dialog", name="Configure fine-tuning")
    await page.get_by_label("Enable LLM judge").check()
    await page.get_by_label("Base model").fill("no/such\u0000model")
    await dialog.get_by_role("button", name="Start").click()
    await expect(dialog.get_by_role("alert")).to_contain_text("base_model_name")
    await expect(dialog).to_be_visible()

    # A launch from the dialog, keyboard only: 30 trials of a paced fake trainer.
    await page.get_by_label("Enable LLM judge").uncheck()
    await page.get_by_label("Base model").fill("tiny/classifier")
    trials = page.get_by_label("Optimisation trials")
    await trials.fill("30")
    await trials.press("Enter")
    await page.wait_for_url("**/studies/*/live")
    await expect(page.locator("#study-state")).to_have_text("RUNNING", timeout=15_000)

    # Cancel asks first; dismissing keeps the study running, accepting ends it.
    page.once("dialog", lambda question: question.dismiss())
    await page.get_by_role("button", name="Cancel study").click()
    await expect(page.locator("#study-state")).to_have_text("RUNNING")
    page.once("dialog", lambda question: question.accept())
    await page.get_by_role("button", name="Cancel study").click()
    await expect(page.locator("#study-state")).to_have_text("CANCELLED", timeout=15_000)
    await expect(page.get_by_role("button", name="Cancel study")).to_be_hidden()
    done = await page.locator("#study-progress").text_content()
    assert done is not None and done.endswith("/ 30") and done != "30 / 30", done

    # Signing out: the next page asks for the token again.
    await page.get_by_role("button", name="Sign out").click()
    await page.wait_for_url("**/sign-in")
    await page.goto(f"{stack.base}/projects")
    await page.wait_for_url(re.compile(r"/sign-in\?next="))
    assert not errors, errors


async def test_a_study_waiting_for_a_trainer_says_so_until_one_appears(
    tmp_path: Path, page: Any
) -> None:
    from tests.unit.optimizer.test_optimizer_core import ComingTrainers

    expect = playwright_api.expect
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    trainers = ComingTrainers()  # scaled to zero: none until it appears
    async with console_stack(tmp_path / "stack", discovery=trainers) as stack:
        await page.goto(f"{stack.base}/projects/7")
        await page.get_by_role("button", name="Quick launch").click()
        await page.wait_for_url("**/studies/*/live")
        waiting = page.locator("#study-waiting")
        await expect(waiting).to_contain_text("waiting for a trainer: 0 ready", timeout=15_000)
        await expect(page.locator("#running-trials")).to_be_hidden()
        trainers.appear()
        await expect(page.locator("#running-trials")).to_be_visible(timeout=15_000)
        await expect(waiting).to_be_hidden()
        await expect(page.locator("#study-state")).to_have_text("COMPLETED", timeout=120_000)
    assert not errors, errors
