"""The console's pages in a real browser: Debian's chromium driven by Playwright.

A projects list, one classification project's launch dialog (the trials field's limits
are the browser's own validity checks), a quick launch, the study followed live through
its event stream to completion, and the best trial's per-class table. With
LORATUNE_SCREENSHOTS=1 the dialog and the study page are saved under docs/console/.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.console_stack import ConsoleStack, console_stack

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
    async with console_stack(tmp_path / "stack") as running:
        yield running


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


async def test_quick_launch_is_followed_live_to_the_best_trials_evaluation(
    stack: ConsoleStack, page: Any
) -> None:
    expect = playwright_api.expect
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))

    # The projects list leads to the project.
    await page.goto(f"{stack.base}/projects")
    await page.get_by_role("link", name="sentiment").click()
    await expect(page.locator("#title")).to_have_text("Project sentiment")
    await expect(page.locator("#quick-note")).to_contain_text("does not apply to classification")

    # The dialog: labelled fields, the project's base model, the judge models with credentials.
    await page.get_by_role("button", name="Configure fine-tuning").click()
    dialog = page.get_by_role("dialog", name="Configure fine-tuning")
    await expect(dialog).to_be_visible()
    await expect(page.get_by_label("Base model")).to_have_value("tiny/classifier")
    options = await page.locator("#judge-model option").all_text_contents()
    assert any(text.endswith("(default)") for text in options), options
    trials = page.get_by_label("Optimisation trials")
    for refused, flag in (("3", "rangeUnderflow"), ("101", "rangeOverflow")):
        await trials.fill(refused)
        assert await trials.evaluate(f"field => field.validity.{flag}")
        assert not await page.locator("#configure-form").evaluate("form => form.checkValidity()")
    await trials.fill("5")
    assert await page.locator("#configure-form").evaluate("form => form.checkValidity()")
    if (path := _screenshot("dialog.png")) is not None:
        await page.screenshot(path=str(path))
    # What the browser lets through and the server refuses: its message, in the dialog.
    await page.get_by_label("Enable LLM judge").check()
    await page.get_by_label("Base model").fill("no/such\u0000model")
    await dialog.get_by_role("button", name="Start").click()
    refusal = await page.evaluate(
        """async () => {
            const response = await fetch("/api/v1/fine-tuning", {method: "POST",
                headers: {"Content-Type": "application/json"},
                body: JSON.stringify({project_id: "7", fine_tuning_params: {use_llm_judge: true,
                    judge_model_id: document.querySelector("#judge-model").value,
                    base_model_name: "no/such\\u0000model", n_trials: 5}})});
            return [response.status, (await response.json()).error.message];
        }"""
    )
    assert refusal[0] == 400, refusal
    await expect(dialog.get_by_role("alert")).to_have_text(refusal[1])
    await expect(dialog).to_be_visible()
    await page.keyboard.press("Escape")
    await expect(dialog).to_be_hidden()

    # Quick launch: 20 trials without the judge, followed on the study page.
    await page.get_by_role("button", name="Quick launch").click()
    await page.wait_for_url("**/studies/*/live")
    await page.evaluate("window.loadedOnce = true")
    state = page.locator("#study-state")
    await expect(state).to_have_text("RUNNING", timeout=15_000)
    await expect(page.locator("#running-trials")).to_be_visible(timeout=15_000)
    await expect(state).to_have_text("COMPLETED", timeout=45_000)
    await expect(page.locator("#study-progress")).to_have_text("20 / 20")
    # Live, not reloaded: the mark set after the first load is still there.
    assert await page.evaluate("window.loadedOnce === true")
    assert await page.locator("#trials tbody tr").count() == 20
    assert await page.locator("svg.chart circle").count() >= 1

    # The best trial, as the summary names it, is the highlighted row; open its evaluation.
    best = (await page.locator("#study-best").text_content() or "").split("#")[-1].rstrip(")")
    best_row = page.locator("#trials tr.best")
    await expect(best_row.locator("td").first).to_have_text(best)
    await best_row.get_by_role("button").click()
    await expect(page.locator("#evaluation-title")).to_have_text(f"Evaluation of trial #{best}")
    per_class = page.locator("#per-class tbody tr")
    await expect(per_class).to_have_count(2)
    await expect(per_class.first.locator("td").first).to_have_text("pos")
    await expect(page.locator("#excluded")).to_contain_text("rare")
    await expect(page.locator("#confusion")).to_be_visible()
    if (path := _screenshot("study.png")) is not None:
        await page.screenshot(path=str(path), full_page=True)
    assert not errors, errors
