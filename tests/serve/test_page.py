"""The chat page at / in a real headless browser (Debian's chromium, driven by Playwright).

Marked `browser`: `.ci/run` installs chromium and runs these (`make test-browser`).
"""

import json
import shutil
import tempfile
import time

import pytest

from .conftest import served

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PACE_S = 0.05
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page(smol):
    from playwright.sync_api import sync_playwright

    if not shutil.which("chromium"):
        pytest.fail("the browser tests need Debian's chromium: apt-get install -y chromium")
    with served(smol, slots=2, slot_len=512) as (url, engine), sync_playwright() as p, \
            tempfile.TemporaryDirectory() as profile:
        # one token per PACE_S at most: the 135M model makes a short reply in a few ms, and a busy
        # browser then takes several streamed events in one task (seen once in CI: the reply grew
        # in a single DOM update); paced, each token is its own update however loaded the machine
        decode = engine._decode
        engine._decode = lambda: (time.sleep(PACE_S), decode())
        browser = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, args=FLAGS,
                                                       headless=True)
        tab = browser.new_page()
        tab.goto(url + "/")
        yield tab, engine
        browser.close()


def _assistant_texts(tab):
    return tab.eval_on_selector_all(".msg.assistant", "els => els.map(e => e.textContent)")


def test_a_message_streams_in_and_the_conversation_is_kept(page, smol):
    tab, _ = page
    tab.wait_for_function("document.getElementById('model').textContent.length > 0")
    tab.fill("#temperature", "0")  # greedy: the reply must equal the generator's
    tab.fill("#input", "What is the capital of France?")
    # streamed: every change of the reply's text is recorded in the page (a MutationObserver, so no
    # change is missed however fast the tokens come), and the reply must be seen growing
    tab.evaluate("""() => {
        window.seen = [];
        new MutationObserver(() => {
            const msgs = document.querySelectorAll('.msg.assistant');
            const text = msgs.length ? msgs[msgs.length - 1].textContent : '';
            if (text && window.seen[window.seen.length - 1] !== text) window.seen.push(text);
        }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
    }""")
    tab.click("#send")
    tab.wait_for_function("!document.getElementById('send').disabled", timeout=60_000)
    snapshots = tab.evaluate("window.seen")
    reply = _assistant_texts(tab)[-1]
    expected = smol.complete_ids([smol.chat_prompt("What is the capital of France?")], max_new_tokens=2000)[0].text
    assert reply == expected and "Paris" in reply
    assert len(snapshots) >= 3 and all(reply.startswith(s) for s in snapshots)

    # the second request carries the whole conversation
    with tab.expect_request("**/v1/chat/completions") as request:
        tab.fill("#input", "And of Italy?")
        tab.press("#input", "Enter")
    sent = json.loads(request.value.post_data)["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"] and sent[1]["content"] == reply
    tab.wait_for_function("!document.getElementById('send').disabled", timeout=60_000)
    assert len(_assistant_texts(tab)) == 2 and _assistant_texts(tab)[1]


def test_stop_ends_a_generation_and_frees_the_slot(page):
    tab, engine = page
    tab.click("#reset")
    tab.fill("#input", "Write a very long story about a dragon and a knight, with many chapters.")
    tab.click("#send")
    tab.wait_for_function("document.querySelectorAll('.msg.assistant').length == 1 && "
                          "document.querySelector('.msg.assistant').textContent.length > 20", timeout=60_000)
    assert engine.stats()["active"] == 1
    tab.click("#stop")
    tab.wait_for_function("!document.getElementById('send').disabled")
    stopped = _assistant_texts(tab)[0]
    for _ in range(100):
        if engine.stats()["active"] == 0:
            break
        tab.wait_for_timeout(50)
    assert engine.stats()["active"] == 0
    tab.wait_for_timeout(300)
    assert _assistant_texts(tab)[0] == stopped  # nothing more arrives after Stop
