"""Headless Chromium for tests that look at a page as a person would: the DOM after its scripts
ran, and screenshots. Tests skip when no Chromium is installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

TIMEOUT_S = 60
# No profile state, no background traffic: the page under test is the only thing loaded.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
    "--virtual-time-budget=5000",
)


def chromium() -> str:
    """The Chromium executable; skips the calling test when there is none."""
    for candidate in ("/usr/bin/chromium", shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("needs Chromium (Debian package `chromium`)")


def _run(args: list[str]) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        done = subprocess.run(
            [chromium(), *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            timeout=TIMEOUT_S,
        )
    if done.returncode != 0:
        raise AssertionError(f"chromium exited {done.returncode}: {done.stderr.decode()[-2000:]}")
    return done


def dump_dom(page: Path) -> str:
    """The page's DOM as HTML after its scripts ran."""
    return _run(["--dump-dom", Path(page).resolve().as_uri()]).stdout.decode("utf-8")


def screenshot(page: Path, out: Path, width: int, height: int) -> Path:
    """A PNG of the page's top ``width`` x ``height`` CSS pixels (one device pixel each)."""
    _run([f"--screenshot={out}", f"--window-size={width},{height}", Path(page).resolve().as_uri()])
    if not Path(out).is_file():
        raise AssertionError(f"chromium wrote no screenshot to {out}")
    return Path(out)
