"""``ai-service dashboard`` as a real process, and headless Chromium (Debian's) through Playwright."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.procs import REPO
from tests.support.sse import free_port, wait_http

CHROMIUM = "/usr/bin/chromium"
#: Screenshots the dashboard tests keep (git-ignored).
ARTIFACTS = REPO / ".work" / "test-artifacts"
#: Run ``ai-service ARGS`` with torch and Ultralytics unimportable: the BE side must not need them.
NO_TORCH = ("import sys; sys.modules['torch'] = None; sys.modules['ultralytics'] = None; "
            "from ai_service.cli import main; sys.exit(main(sys.argv[1:]))")


def no_torch_cli(*args: str) -> list[str]:
    return [sys.executable, "-c", NO_TORCH, *args]


class Dashboard:
    """``ai-service dashboard --port <free>`` with this test's environment; ready once bound."""

    def __init__(self, env: dict[str, str], log_path: Path, *, token: str = "") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full = {**os.environ, **env, "PYTHONUNBUFFERED": "1", **({"HTTP_TOKEN": token} if token else {})}
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(no_torch_cli("dashboard", "--port", str(self.port)), cwd=REPO, env=full,
                                         stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_http(self.url, timeout=60)
            deadline = time.monotonic() + 30
            while "with '#'" not in self.log():
                assert self.proc.poll() is None, self.log()
                assert time.monotonic() < deadline, self.log()
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 15.0) -> str:
        """The log once it holds ``text``: a line logged after an action's effect may come after that effect."""
        deadline = time.monotonic() + timeout
        while text not in (log := self.log()):
            assert time.monotonic() < deadline, f"{text!r} not logged in {timeout} s:\n{log}"
            time.sleep(0.1)
        return log

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium browser (``make install`` puts Debian's at /usr/bin/chromium)."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "no /usr/bin/chromium: `make install` installs Debian's chromium package"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def watch_points(page: Any) -> None:
    """Record every value the chart's point count takes (``window.pointsSeen``, a MutationObserver)."""
    page.evaluate("""() => {
        window.pointsSeen = [];
        const charts = document.getElementById('charts');
        new MutationObserver(() => window.pointsSeen.push(Number(charts.dataset.points)))
            .observe(charts, {attributes: true, attributeFilter: ['data-points']});
    }""")


def points_seen(page: Any) -> list[int]:
    """The point counts the chart showed since :func:`watch_points` (resets to 0 left out)."""
    return [int(n) for n in page.evaluate("window.pointsSeen") if n]
