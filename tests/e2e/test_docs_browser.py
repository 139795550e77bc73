"""The docs pages in a real headless Chromium, with every request off this machine blocked and recorded."""

from __future__ import annotations

import os
from urllib.parse import urlparse

import pytest


@pytest.fixture(scope="module")
def browser_page(browser):
    page = browser.new_page(viewport={"width": 1280, "height": 1600})
    page.outside = []  # requests that tried to leave the machine

    def only_local(route):
        if urlparse(route.request.url).hostname in ("127.0.0.1", "localhost"):
            return route.continue_()
        page.outside.append(route.request.url)
        return route.abort()

    page.route("**/*", only_local)
    yield page
    page.close()


def test_swagger_ui_renders_every_route_offline_and_try_it_out_works(browser_page, server, client):
    page = browser_page
    page.goto(server.url + "/docs")
    page.wait_for_selector(".opblock", timeout=30_000)
    rendered = {
        (el.inner_text().split()[0].strip(), el.get_attribute("data-path"))
        for el in page.query_selector_all(".opblock-summary-path")
    }
    paths = {p for (_, p) in rendered}
    documented = set(client.get("/openapi.json").json()["paths"])
    assert documented <= paths, f"not rendered: {documented - paths}"

    block = page.locator("#operations-phone-price-predict_phone_price")
    block.locator(".opblock-summary").click()
    try_out = block.locator("button.try-out__btn")
    if try_out.count() and "Try it out" in try_out.inner_text():
        try_out.click()
    block.locator("button.execute").click()
    status = block.locator(".live-responses-table tr.response .response-col_status").first
    status.wait_for(timeout=30_000)
    assert status.inner_text().strip().startswith("200")
    assert "price_range" in block.locator(".live-responses-table").inner_text()
    if os.environ.get("DOCS_SCREENSHOT"):
        page.screenshot(path=os.environ["DOCS_SCREENSHOT"], full_page=False)
    assert page.outside == [], f"requests left the machine: {page.outside}"


def test_redoc_renders_offline(browser_page, server):
    page = browser_page
    page.goto(server.url + "/redoc")
    page.wait_for_selector('h2:has-text("Liveness: the process is up")', timeout=30_000)
    assert "phone-price" in page.inner_text("body")
    assert page.outside == [], f"requests left the machine: {page.outside}"
