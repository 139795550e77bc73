"""The playground at / in a real headless Chromium against the real models: each section answers, the poem
arrives one character at a time, a bad field shows the API's own words, no request leaves the server's origin
and the console stays clean. Screenshots for people go to $SCREENSHOT_DIR (else test-artifacts/screenshots/)."""

from __future__ import annotations

import io
import os
from pathlib import Path

from tests.conftest import ROOT

SCREENSHOTS = Path(os.environ.get("SCREENSHOT_DIR") or ROOT / "test-artifacts" / "screenshots")
KEY = "playground-test-key"  # the server has no keys: any key is accepted, and the page must send it
# Records each step of the poem's text: the number of characters shown, each time the DOM changes.
WATCH_POEM = """() => {
  window.poemSteps = [];
  const text = document.querySelector("#poem-text");
  new MutationObserver(() => window.poemSteps.push(text.querySelectorAll(".ch").length))
    .observe(text, { childList: true });
}"""


def watched_page(context, origin: str):
    """A page that records every request, console error and uncaught exception, and blocks any request that
    is not for ``origin``."""
    page = context.new_page()
    page.requests, page.errors = [], []

    def record(request):  # a Python function: Playwright marks its handlers with an attribute
        page.requests.append(request)

    page.on("request", record)
    page.on("console", lambda message: message.type == "error" and page.errors.append(message.text))
    page.on("pageerror", lambda error: page.errors.append(f"uncaught: {error}"))

    def same_origin_only(route):
        return route.continue_() if same_origin(route.request.url, origin) else route.abort()

    page.route("**/*", same_origin_only)
    return page


def same_origin(url: str, origin: str) -> bool:
    """A URL on ``origin``, or a blob: the page made there (the chosen photo, shown before it is sent)."""
    return url.removeprefix("blob:").startswith(origin + "/")


def submit(page, form: str, path: str, keyboard: bool = False):
    """Presses ``form``'s submit button (or focuses it and presses Enter) and returns the POST to ``path``."""
    button = page.locator(f"{form} button[type=submit]")
    with page.expect_response(lambda r: r.request.method == "POST" and r.url.split("?")[0].endswith(path)) as answer:
        if keyboard:
            button.focus()
            page.keyboard.press("Enter")
        else:
            button.click()
    return answer.value


def garment_photo() -> bytes:
    """A dark pair of trousers on a light background, as a phone would photograph one."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (120, 160), "white")
    draw = ImageDraw.Draw(image)
    draw.polygon([(35, 10), (85, 10), (95, 150), (68, 150), (60, 50), (52, 150), (25, 150)], fill=(40, 40, 60))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_every_section_answers_offline_in_a_browser(browser, server, client):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = watched_page(context, server.url)
    page.goto(server.url + "/")
    page.wait_for_selector("#phone-fields input", timeout=30_000)
    assert page.locator("#phone-ram").input_value() == "2549"  # the served example
    page.fill("#api-key", KEY)
    before_key = len(page.requests)
    page.press("#api-key", "Enter")
    page.wait_for_selector("#models-status:text-matches('^Serving')")  # the listing again, with the key
    assert page.evaluate("sessionStorage.getItem('playground.apiKey')") == KEY

    phone = submit(page, "#phone-form", "/phone-price")
    assert phone.status == 200
    page.wait_for_selector("#phone-result .bars li")
    assert page.locator("#phone-result .bars li").count() == 4 and "Prediction set" in page.inner_text("#phone-result")

    assert submit(page, "#house-form", "/house-price", keyboard=True).status == 200
    page.wait_for_selector("#house-result .range-track .interval")
    assert "90 % interval $" in page.inner_text("#house-result")

    canvas = page.locator("#fashion-canvas").bounding_box()
    page.mouse.move(canvas["x"] + 0.4 * canvas["width"], canvas["y"] + 0.1 * canvas["height"])
    page.mouse.down()
    for step in range(1, 11):
        page.mouse.move(canvas["x"] + 0.4 * canvas["width"], canvas["y"] + (0.1 + 0.08 * step) * canvas["height"])
    page.mouse.up()
    fashion = submit(page, "#fashion-form", "/fashion")
    assert fashion.status == 200
    sent = fashion.request.post_data_json["pixels"]
    assert len(sent) == 28 and all(len(row) == 28 for row in sent) and max(map(max, sent)) > 200  # the stroke
    seen = page.evaluate(  # the preview shows exactly what was sent
        "() => Array.from(document.querySelector('#fashion-seen').getContext('2d')"
        ".getImageData(0, 0, 28, 28).data.filter((_, i) => i % 4 === 0))"
    )
    assert seen == [value for row in sent for value in row]
    page.wait_for_selector("#fashion-result .bars li")
    assert page.locator("#fashion-result .bars li").count() == 5

    with page.expect_response(lambda r: r.url.split("?")[0].endswith("/fashion/image")) as upload:
        page.set_input_files(
            "#fashion-file", {"name": "trousers.png", "mimeType": "image/png", "buffer": garment_photo()}
        )
    assert upload.value.status == 200
    page.wait_for_selector("#fashion-photo:not([hidden])")

    page.evaluate(WATCH_POEM)
    page.check("input[name=meter][value=regulated]")
    assert submit(page, "#poem-form", "/poem/stream").status == 200
    page.wait_for_selector("#poem-result table.tones", timeout=30_000)
    poem = page.inner_text("#poem-text").replace("\n", "")
    assert len(poem) == 24 and "rhyme group" in page.inner_text("#poem-result")
    steps = page.evaluate("window.poemSteps")
    growth = sorted(set(steps))
    assert growth == list(range(1, len(poem) + 1)), f"the text did not grow one character at a time: {steps}"

    page.screenshot(path=SCREENSHOTS / "playground-desktop.png", full_page=True, animations="disabled")
    assert page.errors == [], page.errors

    expected = client.post("/phone-price", json={**phone.request.post_data_json, "ram": -5}).json()["detail"]
    page.fill("#phone-ram", "-5")
    assert submit(page, "#phone-form", "/phone-price").status == 422
    page.wait_for_selector("#phone-result .error")
    shown = page.inner_text("#phone-result .error")
    assert [e["msg"] for e in expected if e["loc"][-1] == "ram"][0] in shown and "ram" in shown
    assert page.get_attribute("#phone-ram", "aria-invalid") == "true"
    assert all("status of 422" in e for e in page.errors), page.errors  # Chromium logs each 4xx it fetched

    api_calls = [r for r in page.requests[before_key:] if r.method == "POST" or r.url.endswith("/models")]
    assert len(api_calls) == 7 and all(r.headers.get("x-api-key") == KEY for r in api_calls)
    outside = [r.url for r in page.requests if not same_origin(r.url, server.url)]
    assert outside == [], f"requests left the server's origin: {outside}"
    context.close()


def test_the_page_fits_a_phone_screen(browser, server):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = watched_page(context, server.url)
    page.goto(server.url + "/")
    page.wait_for_selector("#phone-fields input", timeout=30_000)
    assert submit(page, "#phone-form", "/phone-price").status == 200
    page.wait_for_selector("#phone-result .bars li")
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow} px wider than a phone's screen"
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=SCREENSHOTS / "playground-phone.png")
    page.screenshot(path=SCREENSHOTS / "playground-phone-full.png", full_page=True)
    assert page.errors == [], page.errors
    context.close()
