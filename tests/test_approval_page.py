"""The approvals page at /admin in a real browser: Debian's chromium, driven by Playwright (the
system browser, via executable_path: nothing is downloaded).

A person signs in with the admin token (keyboard only), sees the call the agent (the openai SDK
against the app) was blocked on appear, reads its arguments (pretty-printed, the long value
folded), approves it with a comment; the agent's identical retry then passes, and the page's
feed and counters show it. The page is also checked at a phone's width (nothing wider than the
screen). CALLGATE_SCREENSHOT=PATH saves the screenshot the README shows.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import pytest
from playwright.async_api import Page, async_playwright, expect

from tests.conftest import completion
from tests.test_approval import Admin

TOKEN = "s3cret-admin-token"
TIMEOUT_MS = 15_000  # each browser step; the whole test is bounded by these
# The page polls the admin API every 2 s; a new card or feed entry shows at the next poll, so
# the test would spend most of its time waiting for timers. The same poll, only sooner: every
# interval the page sets is capped at 100 ms (the page sets one, the poll timer).
FAST_POLL = """
const nativeSetInterval = window.setInterval.bind(window);
window.setInterval = (fn, ms, ...rest) => nativeSetInterval(fn, Math.min(ms || 0, 100), ...rest);
"""


def find_chromium() -> str | None:
    for name in (os.environ.get("CALLGATE_CHROMIUM"), "chromium", "chromium-browser"):
        if name and (path := shutil.which(name)):
            return path
    return None


CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium not found (tests/run installs Debian's chromium; or set CALLGATE_CHROMIUM)",
)

POLICY = {
    "on_block": "reprompt",
    "server": {"admin_token": TOKEN},
    "tools": {
        "transfer": {
            "approval": {"when": "args.amount > 100", "ttl": "1h", "approvers": ["finance"]},
            "rate_limit": {"max_calls": 10, "window": "1h"},
        },
        "lookup": {},
        "drop_table": {"allow": False},
    },
}
MEMO = "Quarterly settlement for invoice batch 2024-Q3. " * 12  # folded on the page
ARGS = {"to": "DE89 3704 0044 0532 0130 00", "amount": 2500, "currency": "EUR", "memo": MEMO}
TOOLS = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
    for n in ("transfer", "lookup", "drop_table")
]


def model(received: Any) -> dict[str, Any]:
    """The scripted model: asks for the transfer; reports what the tool result said."""
    last = received.body["messages"][-1]
    if last["role"] == "tool":
        result = json.loads(last["content"])
        if result.get("reason") == "approval_required":
            return completion(content=f"A person must approve {result['approval_id']} first.")
        if result.get("error"):
            return completion(content="That tool is not allowed.")
        return completion(content=f"Done: {result['status']}")
    return completion(("transfer", ARGS), ids=[f"call_{len(received.body['messages'])}"])


def client(proxy: Any) -> Any:
    return proxy.client(default_headers={"X-Callgate-Principal": "alice"})


async def agent(proxy: Any, upstream: Any, messages: list[Any]) -> Any:
    upstream.push(model, model)
    resp = await client(proxy).chat.completions.create(
        model="gpt-test", messages=messages, tools=TOOLS
    )
    return resp.choices[0].message


async def background(proxy: Any, upstream: Any) -> None:
    """Some other traffic for the feed and the counters: an allowed and a rule-blocked call."""
    bob = proxy.client(default_headers={"X-Callgate-Principal": "bob"})
    upstream.push(completion(("lookup", {"account": "acct-9"})))
    await bob.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "look"}], tools=TOOLS
    )
    upstream.push(completion(("drop_table", {"name": "users"})), completion(content="No."))
    await bob.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "drop"}], tools=TOOLS
    )


async def no_wider_than_the_screen(page: Page) -> None:
    widths = await page.evaluate(
        "[document.documentElement.scrollWidth, window.innerWidth]"
    )
    assert widths[0] <= widths[1], widths


async def test_approve_in_the_page_then_the_retry_passes(
    make_proxy: Any, upstream: Any, tmp_path: Any
) -> None:
    proxy = await make_proxy(POLICY, clock=time.time)  # real time: the page shows real dates
    await background(proxy, upstream)
    args: list[str] = ["--no-sandbox"] if os.geteuid() == 0 else []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=args, timeout=TIMEOUT_MS
        )
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            await page.add_init_script(FAST_POLL)
            page.set_default_timeout(TIMEOUT_MS)
            expect.set_options(timeout=TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(proxy.root + "/admin")

            # Sign in with the keyboard: the skip link, then the token field, then Enter.
            await page.keyboard.press("Tab")
            await page.keyboard.press("Tab")
            assert await page.evaluate("document.activeElement.id") == "token"
            await page.keyboard.type(TOKEN)
            await page.keyboard.press("Enter")
            await expect(page.locator("#status")).to_have_text("Signed in.")
            await expect(page.locator("#pending")).to_contain_text("Nothing is waiting.")
            await expect(page.locator("#counters tbody tr")).to_have_count(2)

            # The agent is blocked; its call appears on the page.
            messages: list[Any] = [{"role": "user", "content": "Pay the Q3 invoices"}]
            first = await agent(proxy, upstream, messages)
            assert first.content.startswith("A person must approve apr_")
            approval_id = first.content.split()[4]
            card = page.locator(f"#card-{approval_id}")
            await expect(card.get_by_role("heading", name="transfer")).to_be_visible()
            await expect(card).to_contain_text("approvers: finance")
            await expect(card).to_contain_text("by alice")
            summary = card.locator(f"#args-{approval_id}")
            text = await summary.inner_text()
            assert '  "amount": 2500,' in text  # pretty-printed
            assert "more characters)" in text and MEMO not in text  # the long memo folded
            await expect(page.locator("#feed")).to_contain_text("approval_required")
            if shot := os.environ.get("CALLGATE_SCREENSHOT"):
                await page.screenshot(path=shot, full_page=True)
            await page.screenshot(path=str(tmp_path / "page.png"))
            assert (tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            await card.get_by_text("Show the full arguments").click()
            assert MEMO in await card.locator("details pre").inner_text()

            # Approve with a comment, keyboard only: comment field, Tab, Enter on Approve.
            await card.get_by_label("Comment (optional)").fill("Matches the signed invoice.")
            await page.keyboard.press("Tab")
            assert await page.evaluate("document.activeElement.textContent") == "Approve"
            await page.keyboard.press("Enter")
            await expect(page.locator("#status")).to_have_text(
                f"Approved transfer ({approval_id})."
            )
            await expect(card).to_have_count(0)
            await expect(page.locator("#pending")).to_contain_text("Nothing is waiting.")
            # Focus went somewhere useful (the list's heading), not to the page's top.
            assert await page.evaluate("document.activeElement.id") == "pending-heading"

            status, answered = await Admin(proxy.root, TOKEN).request(
                "GET", f"/admin/approvals/{approval_id}"
            )
            assert status == 200 and answered["state"] == "approved"
            assert answered["comment"] == "Matches the signed invoice."

            # The model's identical retry passes, and the page shows it.
            messages += [
                {"role": "assistant", "content": first.content},
                {"role": "user", "content": "Approved, go ahead."},
            ]
            retry = await agent(proxy, upstream, messages)
            [call] = retry.tool_calls or []
            assert call.function.name == "transfer" and json.loads(call.function.arguments) == ARGS
            feed = page.locator("#feed li").first
            await expect(feed).to_contain_text(f"approval {approval_id} used")
            await expect(feed.locator(".badge")).to_have_text("allowed")
            row = page.locator('#counters tr[data-tool="transfer"]')
            await expect(row.locator("td")).to_have_text(["1", "1", "approval: 1"])
            await expect(page.locator('#counters tr[data-tool="drop_table"] td')).to_have_text(
                ["0", "1", "rules: 1"]
            )

            # A phone: one column, nothing wider than the screen, buttons still reachable.
            await page.set_viewport_size({"width": 390, "height": 844})
            await agent(proxy, upstream, [{"role": "user", "content": "Pay again"}])
            await expect(page.locator("#pending .card")).to_have_count(1)
            await no_wider_than_the_screen(page)
            box = await page.locator("#pending .card button.deny").bounding_box()
            assert box is not None and box["x"] + box["width"] <= 390 and box["height"] >= 40
            assert errors == []
        finally:
            await browser.close()


async def test_wrong_token_is_told(make_proxy: Any, upstream: Any) -> None:
    proxy = await make_proxy(POLICY)
    args: list[str] = ["--no-sandbox"] if os.geteuid() == 0 else []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=args, timeout=TIMEOUT_MS
        )
        try:
            page = await browser.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            await page.goto(proxy.root + "/admin")
            await page.get_by_label("Admin token or JWT").fill("not-the-token")
            await page.get_by_role("button", name="Sign in").click()
            await expect(page.locator("#status")).to_contain_text(
                "Not signed in: Missing or wrong admin credential", timeout=TIMEOUT_MS
            )
            await expect(page.get_by_role("button", name="Sign in")).to_be_visible()
            # Nothing was kept: a reload asks again.
            assert await page.evaluate("sessionStorage.length") == 0
        finally:
            await browser.close()
