"""The environment is the locked one, and the lock keeps out the releases known to be bad.

`make install` installs requirements.lock with --require-hashes --no-deps, then the project with
--no-deps. These tests hold that promise to account: what is installed is what the lock pins, the
lock pins nothing setup.cfg's floors exclude, every pin carries a hash, and the lock is the whole
dependency closure (with --no-deps nothing else would notice a missing package).
"""

from __future__ import annotations

import configparser
import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
SETUP_CFG = ROOT / "setup.cfg"

# Releases that must never be installed. The floors in setup.cfg say why.
BAD_RELEASES: dict[str, list[str]] = {
    # compromised uploads to PyPI (a crypto miner)
    "ultralytics": ["8.3.41", "8.3.42", "8.3.45", "8.3.46"],
    # weights_only unpickler: CVE-2025-32434 (< 2.6), CVE-2026-24747 (< 2.10)
    "torch": ["2.5.1", "2.6.0", "2.8.0", "2.9.1"],
    "torchvision": ["0.24.1"],
    # CVE-2024-28219 (10.2), CVE-2025-48379 (11.2), CVE-2026-25990 (12.1.0), CVE-2026-40192 (12.1.1),
    # PYSEC-2026-2253..2257 (12.2.0)
    "pillow": ["10.2.0", "11.2.1", "12.1.0", "12.1.1", "12.2.0"],
    # CVE-2024-27318/27319 (1.15), CVE-2024-5187 (1.16.1), CVE-2026-27489/28500/34445 (1.20.1)
    "onnx": ["1.15.0", "1.16.1", "1.20.1"],
    # CVE-2025-4565 (5.29.4), CVE-2026-0994 (6.33.4)
    "protobuf": ["4.25.7", "5.29.4", "6.33.4"],
}

# The packages whose installed version must be exactly the lock's.
CHECKED = ["torch", "torchvision", "ultralytics", "pika", "pydantic", "pillow", "onnx"]

# Left out of the lock on purpose: it phones home during export (see the Makefile).
EXCLUDED = {"openvino-telemetry"}
# In the lock though nothing requires them: pip itself and the build backend of pyproject.toml.
TOOLING = {"pip", "setuptools", "wheel"}


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    line: str


def _logical_lines(text: str) -> list[str]:
    """The lock's lines with backslash continuations joined and comments dropped."""
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not stripped:
            if current:
                lines.append(current)
                current = ""
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1].strip() + " "
        else:
            lines.append(current + stripped)
            current = ""
    if current:
        lines.append(current.strip())
    return lines


def parse_lock(text: str) -> dict[str, Pin]:
    pins: dict[str, Pin] = {}
    for line in _logical_lines(text):
        if line.startswith("-"):
            raise AssertionError(f"the lock carries an option, not a pinned requirement: {line!r}")
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
        if match is None:
            raise AssertionError(f"a requirement in the lock is not pinned with ==: {line!r}")
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"{name} is pinned twice in the lock"
        pins[name] = Pin(name, match.group(2), line)
    return pins


def setup_cfg_requirements(*, extras: bool = True) -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(SETUP_CFG)
    blocks = [cfg["options"]["install_requires"]]
    if extras:
        blocks += list(cfg["options.extras_require"].values())
    return [Requirement(line.strip()) for block in blocks for line in block.splitlines()
            if line.strip() and not line.strip().startswith("#")]


@pytest.fixture(scope="module")
def lock() -> dict[str, Pin]:
    return parse_lock(LOCK.read_text())


def test_the_lock_parser_reads_pins_and_refuses_an_unpinned_line() -> None:
    text = ("# header\n"
            "torch==2.14.1 \\\n    --hash=sha256:aa \\\n    --hash=sha256:bb\n    # via ai-service\n"
            "pika==1.4.4 --hash=sha256:cc\n")
    pins = parse_lock(text)
    assert {name: pin.version for name, pin in pins.items()} == {"torch": "2.14.1", "pika": "1.4.4"}
    assert pins["torch"].line.count("--hash=sha256:") == 2
    with pytest.raises(AssertionError, match="not pinned"):
        parse_lock("torch>=2.10 \\\n    --hash=sha256:aa\n")


@pytest.mark.parametrize("name", CHECKED)
def test_installed_torch_and_ultralytics_are_the_locked_versions(lock: dict[str, Pin], name: str) -> None:
    assert name in lock, f"{name} is not in {LOCK.name}"
    installed = importlib.metadata.version(name)
    assert Version(installed) == Version(lock[name].version), (
        f"{name} {installed} is installed but {LOCK.name} pins {lock[name].version}: run `make install`")


def test_every_requirement_line_in_the_lock_has_a_sha256_hash(lock: dict[str, Pin]) -> None:
    unhashed = [pin.name for pin in lock.values() if not re.search(r"--hash=sha256:[0-9a-f]{64}\b", pin.line)]
    assert not unhashed, f"pins without a sha256 hash in {LOCK.name}: {unhashed}"
    assert len(lock) > 50  # the whole closure (torch alone brings ~25), not a handful of direct pins


def test_the_lock_pins_the_cuda_wheels_torch_pulls_in(lock: dict[str, Pin]) -> None:
    torch_needs = [Requirement(r) for r in importlib.metadata.requires("torch") or []]
    needed = {canonicalize_name(r.name) for r in torch_needs if r.marker is None or r.marker.evaluate({"extra": ""})}
    assert {"triton", "nvidia-cudnn-cu13", "nvidia-nccl-cu13"} <= needed
    assert needed - set(lock) == set()
    assert any(name.startswith("nvidia-") for name in lock)


def test_the_setup_cfg_floors_exclude_the_compromised_and_vulnerable_releases() -> None:
    declared: dict[str, SpecifierSet] = {canonicalize_name(r.name): r.specifier for r in setup_cfg_requirements()}
    for name, bad in BAD_RELEASES.items():
        assert name in declared, f"setup.cfg has no requirement on {name} to carry its floor"
        admitted = [v for v in bad if declared[name].contains(v, prereleases=True)]
        assert not admitted, f"setup.cfg's {name}{declared[name]} admits known-bad {admitted}"


def test_the_lock_pins_no_known_bad_release_and_torch_is_at_least_2_10(lock: dict[str, Pin]) -> None:
    for name, bad in BAD_RELEASES.items():
        assert name in lock, f"{name} is not in {LOCK.name}"
        assert Version(lock[name].version) not in {Version(v) for v in bad}, f"{LOCK.name} pins bad {name}"
    assert Version(lock["torch"].version) >= Version("2.10")
    assert Version(lock["ultralytics"].version) >= Version("8.3.47")


def test_every_setup_cfg_requirement_is_pinned_in_the_lock_within_its_range(lock: dict[str, Pin]) -> None:
    """A requirement added to setup.cfg without `make lock` would never be installed (--no-deps)."""
    for req in setup_cfg_requirements():
        name = canonicalize_name(req.name)
        assert name in lock, f"setup.cfg requires {req} but {LOCK.name} has no pin for it: run `make lock`"
        assert req.specifier.contains(lock[name].version, prereleases=True), (
            f"{LOCK.name} pins {name}=={lock[name].version}, outside setup.cfg's {req}: run `make lock`")


def _closure(roots: list[Requirement]) -> set[str]:
    """Every distribution the roots need in this environment, following installed metadata."""
    seen: set[tuple[str, frozenset[str]]] = set()
    names: set[str] = set()
    todo = [(req.name, frozenset(req.extras)) for req in roots]
    while todo:
        name, extras = todo.pop()
        key = (canonicalize_name(name), extras)
        if key in seen:
            continue
        seen.add(key)
        names.add(key[0])
        if key[0] in EXCLUDED:
            continue
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # reported below: it is not in the lock, or the lock is not what is installed
        for spec in requires:
            req = Requirement(spec)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
                todo.append((req.name, frozenset(req.extras)))
    return names


def test_the_lock_is_the_whole_dependency_closure_and_nothing_more(lock: dict[str, Pin]) -> None:
    needed = _closure(setup_cfg_requirements())
    missing = needed - set(lock) - EXCLUDED
    assert not missing, f"needed but not in {LOCK.name} (so never installed): {sorted(missing)}"
    stray = set(lock) - needed - TOOLING
    assert not stray, f"in {LOCK.name} though nothing needs them: {sorted(stray)}"
    assert not EXCLUDED & set(lock), f"{sorted(EXCLUDED)} must stay out of {LOCK.name}"
