"""The web chat page (``GET /``) in a real headless Chromium, on two real devices.

Real parts only: a redis-server child, two `python -m edgebundle run` children on the
embedded runtime with a scripted model (real llama.cpp inference), and one Chromium
per device driven by selenium. What a page shows is read from the DOM and compared
with what the gateway stored (HTTP); every streamed text a page showed while a reply
was written must be the start of the stored reply (nothing shown twice or out of order).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from edgebundle.demo_model import ScriptedModelSpec, write_scripted_model
from tests.support.devices import mirrored, serving, sync_devices
from tests.support.redis_server import RedisServer
from tests.support.serving import RunProcess
from tests.support.tcp_proxy import TcpProxy

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-extensions", "--no-first-run")
# The scripted model says w001 … w400 (distinct words: a part shown twice or out of
# order is visible), then repeats w400 until max_tokens or a cancel stops it. Eight
# (empty) layers make a token cost real work, ~10 ms here: a long reply lasts seconds,
# time to watch, stop and reload mid-reply.
WORDS = [f"w{i:03d}" for i in range(1, 401)]
LONG_REPLY = 800  # max_tokens of the turns the tests watch
WAIT = 120.0  # generous: two devices and two browsers share two cores with other tests

T = TypeVar("T")


def eventually(probe: Callable[[], T | None], what: str, timeout: float = WAIT) -> T:
    """The first truthy result of ``probe``, polled until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# What the page shows, read from the DOM (textContent: exactly the text, no layout).
_SHOWN = """
return [...document.querySelectorAll('#messages > li')].map(li => ({
  id: li.dataset.messageId,
  role: li.classList.contains('user') ? 'user' : li.classList.contains('assistant')
        ? 'assistant' : 'system',
  status: li.dataset.status,
  device: li.querySelector('.device').textContent,
  text: li.querySelector('.content').textContent,
}));
"""


# Read the reply, keep the page busy for half a second (the device writes on; the page
# falls behind like a slow phone), then press Stop: the reply must keep the text read,
# not the device's newer text.
_STOP_AND_READ = """
const replies = document.querySelectorAll('#messages > li.assistant');
const text = replies[replies.length - 1].querySelector('.content').textContent;
const until = performance.now() + 500;
while (performance.now() < until) {}
document.getElementById('stop').click();
return text;
"""


class Page:
    """One browser (its own Chromium) showing the chat page of one gateway."""

    def __init__(self, driver: webdriver.Chrome, base_url: str) -> None:
        self.driver = driver
        self.base_url = base_url
        self.streamed: list[str] = []  # every in-progress reply text seen on this page

    def open(self, query: str = "", fragment: str = "") -> None:
        self.driver.get(f"{self.base_url}/{query}{fragment}")
        eventually(lambda: self.driver.execute_script("return document.readyState")
                   == "complete", "the page to load")

    def shown(self) -> list[dict[str, str]]:
        return list(self.driver.execute_script(_SHOWN))

    def element(self, element_id: str) -> Any:
        return self.driver.find_element(By.ID, element_id)

    def thread_id(self) -> str:
        fragment = str(self.driver.execute_script("return location.hash"))
        return fragment.removeprefix("#thread=") if fragment.startswith("#thread=") else ""

    def send(self, text: str) -> None:
        self.element("input").send_keys(text)
        self.element("send").click()

    def reply(self, status: str | None = None, min_chars: int = 1,
              after: int = 0) -> dict[str, str] | None:
        """The last message if it is the assistant's with ``status`` and some text (and
        comes after ``after`` other messages)."""
        shown = self.shown()
        if len(shown) <= after or shown[-1]["role"] != "assistant":
            return None
        last = shown[-1]
        if last["status"] == "in_progress":
            self.streamed.append(last["text"])
        wanted = status is None or last["status"] == status
        return last if wanted and len(last["text"]) >= min_chars else None


def chromium() -> webdriver.Chrome:
    options = Options()
    options.binary_location = CHROMIUM
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_scripted_model(tmp_path_factory.mktemp("models") / "endless.gguf",
                                ScriptedModelSpec(reply=" ".join(WORDS), end_token=None,
                                                  context_length=2048, layers=8))


def device_args(model: Path, redis: RedisServer, device_id: str) -> list[str]:
    return ["--runtime", "embedded", "--no-preflight", "--model", str(model),
            "--template", "llama-3-chat", "--redis-url", redis.url, "--device-id", device_id]


@pytest.fixture(scope="module")
def devices(redis: RedisServer, model: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunProcess, RunProcess]]:
    runs = [RunProcess(device_args(model, redis, name), home=tmp_path_factory.mktemp(name))
            for name in ("devA", "devB")]
    with serving(runs):
        yield runs[0], runs[1]


@pytest.fixture(scope="module")
def browsers() -> Iterator[tuple[webdriver.Chrome, webdriver.Chrome]]:
    drivers: list[webdriver.Chrome] = []
    try:
        drivers.append(chromium())
        drivers.append(chromium())
        yield drivers[0], drivers[1]
    finally:
        for driver in drivers:
            driver.quit()


@pytest.fixture
def pages(devices: tuple[RunProcess, RunProcess],
          browsers: tuple[webdriver.Chrome, webdriver.Chrome]) -> tuple[Page, Page, str]:
    """Page A starts a new thread with its button; page B joins it by id. Both show it."""
    a = Page(browsers[0], devices[0].base_url)
    b = Page(browsers[1], devices[1].base_url)
    a.open(f"?max_tokens={LONG_REPLY}")
    known = a.thread_id()
    a.element("new-thread").click()
    thread_id = eventually(lambda: "" if a.thread_id() == known else a.thread_id(),
                           "a new thread")
    b.open()
    b.element("join-id").send_keys(thread_id)
    b.element("join-form").find_element(By.TAG_NAME, "button").click()
    eventually(lambda: b.thread_id() == thread_id, "page B to join the thread")

    def listed() -> list[str]:  # read in the page: the picker's options are replaced
        return list(b.driver.execute_script(
            "return [...document.querySelectorAll('#thread-select option')].map(o => o.value)"))

    # The picker lists it (kept in localStorage) once the gateway answered the join.
    eventually(lambda: listed()[:1] == [thread_id], "the picker to list the thread")
    return a, b, thread_id


def stored(run: RunProcess, thread_id: str) -> list[dict[str, Any]]:
    state = httpx.get(f"{run.base_url}/v1/threads/{thread_id}", timeout=30).json()
    return sorted(state["messages"], key=lambda m: m["position"])


def as_shown(messages: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(role, status, text) of stored messages or of messages shown by a page."""
    return [(m["role"], m["status"], m["content"] if "content" in m else m["text"])
            for m in messages]


def assert_no_script_errors(*pages: Page) -> None:
    """No uncaught error in the pages' scripts (the browser log since the last look)."""
    for page in pages:
        log: list[dict[str, Any]] = page.driver.get_log("browser")  # type: ignore[no-untyped-call]
        errors = [entry["message"] for entry in log if entry.get("source") == "javascript"]
        assert errors == []


def assert_streamed_in_order(page: Page, reply: str) -> None:
    """Each text the page showed while the reply was written is a start of the reply."""
    assert page.streamed, "the page never showed the reply while it was written"
    for text in page.streamed:
        assert reply.startswith(text), (
            f"shown mid-reply: …{text[-80:]!r}, not the start of the stored reply "
            f"…{reply[max(0, len(text) - 80):len(text)]!r}")


def test_a_message_sent_on_a_streams_on_a_and_live_on_b(
    pages: tuple[Page, Page, str], devices: tuple[RunProcess, RunProcess],
) -> None:
    a, b, thread_id = pages
    a.send("hello from A")
    # Both pages show the reply while it is written (B through its watch + the run's events).
    streaming_a = eventually(lambda: a.reply("in_progress"), "A to stream the reply")
    streaming_b = eventually(lambda: b.reply("in_progress"), "B to stream the reply live")
    assert streaming_b["id"] == streaming_a["id"]
    assert [(m["role"], m["text"]) for m in b.shown()][0] == ("user", "hello from A")
    eventually(lambda: "devA is replying" in b.element("activity").text and
               b.reply("in_progress"), "B to say which device replies, while it does")

    done_a = eventually(lambda: a.reply("completed"), "A to finish the reply")
    done_b = eventually(lambda: b.reply("completed"), "B to finish the reply")
    final = stored(devices[1], thread_id)
    assert as_shown(a.shown()) == as_shown(b.shown()) == as_shown(final)
    reply = final[1]["content"]
    assert reply.split(" ") == WORDS + [WORDS[-1]] * (LONG_REPLY - len(WORDS))
    assert done_a["text"] == done_b["text"] == reply
    assert_streamed_in_order(a, reply)
    assert_streamed_in_order(b, reply)
    assert done_b["device"] == done_a["device"] == "from devA"
    assert b.element("stop").get_attribute("disabled") is not None
    assert_no_script_errors(a, b)


def test_stop_on_a_mid_reply_keeps_exactly_the_text_shown(
    pages: tuple[Page, Page, str], devices: tuple[RunProcess, RunProcess],
) -> None:
    a, b, thread_id = pages
    a.send("say a lot")
    eventually(lambda: a.reply("in_progress", min_chars=40), "A to show some of the reply")
    # Read the reply and press Stop in one turn of the page: nothing paints in between.
    shown_at_stop = a.driver.execute_script(_STOP_AND_READ)
    stopped = eventually(lambda: a.reply("incomplete"), "A to show the reply stopped")
    kept = stored(devices[1], thread_id)[-1]
    assert (kept["status"], kept["content"]) == ("incomplete", shown_at_stop)
    assert stopped["text"] == shown_at_stop
    words = stopped["text"].split(" ")
    assert len(words) < LONG_REPLY and words == (WORDS + [WORDS[-1]] * LONG_REPLY)[:len(words)]
    # B shows the same stopped text (the final copy replaced what it streamed).
    on_b = eventually(lambda: b.reply("incomplete"), "B to show the reply stopped")
    assert on_b["text"] == stopped["text"]
    assert as_shown(b.shown()) == as_shown(stored(devices[0], thread_id))
    assert_streamed_in_order(a, stopped["text"])
    assert_no_script_errors(a, b)


def test_reloading_b_mid_stream_resumes_without_repeating_text(
    pages: tuple[Page, Page, str], devices: tuple[RunProcess, RunProcess],
) -> None:
    a, b, thread_id = pages
    a.send("keep going")
    before = eventually(lambda: b.reply("in_progress", min_chars=20), "B to stream the reply")
    b.driver.refresh()
    b.streamed.clear()
    # The reloaded page replays the run's events, then follows it live.
    again = eventually(lambda: b.reply("in_progress"), "B to resume the reply after a reload")
    assert again["id"] == before["id"] and b.thread_id() == thread_id
    done = eventually(lambda: b.reply("completed"), "B to show the finished reply")
    final = stored(devices[1], thread_id)
    assert done["text"] == final[-1]["content"]
    assert_streamed_in_order(b, done["text"])  # after the reload too: no part twice
    assert as_shown(b.shown()) == as_shown(final) == as_shown(a.shown())
    assert_no_script_errors(a, b)


def test_a_turn_refused_for_another_epoch_is_sent_again_after_a_full_sync(
    pages: tuple[Page, Page, str], devices: tuple[RunProcess, RunProcess],
) -> None:
    # Page A holds an epoch the gateway no longer has, as a page does for a moment after
    # its device switched between the central Redis and its local store: the POST of
    # the turn answers 409 epoch_mismatch.
    a, _, thread_id = pages
    a.driver.execute_script("current.epoch = 'an-epoch-of-another-store';")
    a.element("max-tokens").clear()
    a.element("max-tokens").send_keys("3")
    a.send("after the switch")
    done = eventually(lambda: a.reply("completed", after=1), "the reply of the turn")
    assert as_shown(stored(devices[0], thread_id))[-2:] == [
        ("user", "completed", "after the switch"), ("assistant", "completed", done["text"])]
    assert as_shown(a.shown()) == as_shown(stored(devices[0], thread_id))  # each once
    assert a.element("status").text == "" and a.element("input").get_property("value") == ""
    assert_no_script_errors(a)


def test_with_an_api_key_the_page_is_open_and_its_calls_send_the_key(
    redis: RedisServer, model: Path, tmp_path: Path,
    browsers: tuple[webdriver.Chrome, webdriver.Chrome],
) -> None:
    run = RunProcess(device_args(model, redis, "devK"), home=tmp_path / "home",
                     env={"EDGEBUNDLE_API_KEY": "k3y"})
    try:
        run.read_line()
        run.wait_healthy()
        http = httpx.Client(base_url=run.base_url, timeout=30)
        page = http.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert '<script src="/web/chat.js"' in page.text
        for path, media_type in (("/web/chat.js", "text/javascript"),
                                 ("/web/chat.css", "text/css")):
            asset = http.get(path)
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(
                media_type)
        assert http.post("/v1/threads", json={}).status_code == 401
        assert http.get("/v1/models").status_code == 401
        assert http.get("/web/other.js").status_code == 401  # only the page's files are open

        browser = Page(browsers[0], run.base_url)
        browser.open("?max_tokens=3")
        key_form = browser.element("key-form")
        assert not key_form.is_displayed()
        browser.element("new-thread").click()
        eventually(key_form.is_displayed, "the API key field after a 401")
        browser.element("key-input").send_keys("k3y")
        key_form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        browser.element("new-thread").click()
        thread_id = eventually(browser.thread_id, "a new thread with the key")
        browser.send("hi")
        done = eventually(lambda: browser.reply("completed"), "the reply with the key")
        assert not key_form.is_displayed()
        assert done["text"] == stored_with_key(http, thread_id)[-1]["content"]
        assert run.stop() == 0, run.stderr()
    finally:
        run.close()


def stored_with_key(http: httpx.Client, thread_id: str) -> list[dict[str, Any]]:
    state = http.get(f"/v1/threads/{thread_id}", headers={"Authorization": "Bearer k3y"}).json()
    return sorted(state["messages"], key=lambda m: m["position"])


def test_a_message_sent_while_redis_is_down_is_sent_again_and_lands_once(
    model: Path, tmp_path: Path, browsers: tuple[webdriver.Chrome, webdriver.Chrome],
) -> None:
    # A Redis of its own, restarted on its append-only file: the thread outlives it.
    redis = RedisServer(tmp_path / "redis", aof=True).start()
    try:
        with serving([RunProcess(device_args(model, redis, "devR"),
                                 home=tmp_path / "home")]) as [run]:
            page = Page(browsers[0], run.base_url)
            page.open("?max_tokens=5")
            page.element("new-thread").click()
            thread_id = eventually(page.thread_id, "a new thread")
            eventually(lambda: page.element("thread-select").get_property("value")
                       == thread_id, "the page to open the thread")
            redis.stop()
            page.send("are you there")  # the gateway answers 503 redis_unavailable ...
            eventually(lambda: "Connection lost; retrying" in page.element("status").text,
                       "the page to say it retries")
            assert page.element("input").get_property("value") == "are you there"
            assert page.element("send").get_property("disabled") is True
            redis.start()  # ... until Redis is back, and the same turn lands
            done = eventually(lambda: page.reply("completed"), "the reply once Redis is back")
            final = stored(run, thread_id)
            assert as_shown(final) == [("user", "completed", "are you there"),
                                       ("assistant", "completed", done["text"])]
            assert as_shown(page.shown()) == as_shown(final)  # the reply shown once
            assert done["text"] == " ".join(WORDS[:5])
            assert page.element("input").get_property("value") == ""
            assert page.element("send").get_property("disabled") is False
            assert_no_script_errors(page)
    finally:
        redis.stop()


def test_a_device_cut_off_from_the_central_redis_says_offline_and_sends_the_turn_on_heal(
    model: Path, tmp_path: Path, browsers: tuple[webdriver.Chrome, webdriver.Chrome],
) -> None:
    # Device C reaches the central Redis through a proxy the test cuts (the partition);
    # device A directly. The page is C's: it chats on from C's local store meanwhile.
    central = RedisServer(tmp_path / "central", aof=True).start()
    proxy = TcpProxy(central.port).start()
    urls = [central.url, central.url.replace(f":{central.port}/", f":{proxy.port}/")]
    try:
        with sync_devices(urls, model, [tmp_path / "A", tmp_path / "C"], ids=("devA", "devC"),
                          extra_args=("--offline-after", "1")) as (a, c):
            page = Page(browsers[0], c.run.base_url)
            page.open("?max_tokens=5")
            page.element("new-thread").click()
            thread_id = eventually(page.thread_id, "a new thread")
            page.send("hello")
            eventually(lambda: page.reply("completed"), "the reply while online")
            eventually(lambda: mirrored(c, central, thread_id), "C to keep a copy of it")
            badge = page.element("link-state")
            assert not badge.is_displayed()

            proxy.cut(hold=True)
            eventually(lambda: badge.text == "offline, 0 pending", "the page to say offline")
            page.send("still there?")
            done = eventually(lambda: page.reply("completed", after=3),
                              "the reply of C's own model")
            assert done["text"] == " ".join(WORDS[:5])
            eventually(lambda: badge.text == "offline, 2 pending", "the turn counted pending")

            proxy.resume()  # C sends the turn; the thread is served centrally again
            eventually(lambda: not badge.is_displayed(), "the badge to clear")
            offline_turn = [("user", "completed", "still there?"),
                            ("assistant", "completed", done["text"])]
            assert as_shown(stored(a.run, thread_id))[2:] == offline_turn  # on A too, once
            # The page followed the thread across both epoch switches and goes on.
            page.send("and now?")
            eventually(lambda: page.reply("completed", after=5),
                       "the reply of a turn after the heal")
            assert as_shown(page.shown()) == as_shown(stored(a.run, thread_id))
            eventually(lambda: [m["device"] for m in page.shown()] == ["", "from devC"] * 3,
                       "every reply labelled with its device", timeout=10)
            assert page.driver.execute_script(
                "return linkState({sync: {link: 'online', pending: 3}}).text"
            ) == "sending 3 changes…"  # what shows while the heal sends
            assert_no_script_errors(page)
    finally:
        proxy.stop()
        central.stop()
