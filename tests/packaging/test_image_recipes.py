"""The two builds of the agent image agree (daemonset/Containerfile for builders with a
registry, scripts/image without one), and the image's pinned Python packages are the ones the
tests run with."""

from __future__ import annotations

import json
import re
from pathlib import Path

from runtime_lock import parse, render, runtime_closure

ROOT = Path(__file__).resolve().parents[2]
IMAGE_DIR = ROOT / "daemonset" / "image"
CONTAINERFILE = (ROOT / "daemonset" / "Containerfile").read_text()
SCRIPT = (ROOT / "scripts" / "image").read_text()


def test_the_pins_are_the_runtime_closure_of_this_environment() -> None:
    lock = (IMAGE_DIR / "requirements.txt").read_text()
    closure = runtime_closure()
    assert parse(lock) == closure, "run scripts/image --update-lock"
    assert lock == render(closure)
    assert {"trio", "msgpack", "python-iptables", "cryptography"} <= set(closure)


def test_the_build_pins_are_this_environment_s() -> None:
    from importlib.metadata import version

    pins = parse((IMAGE_DIR / "build-requirements.txt").read_text())
    assert pins == {"pip": version("pip"), "setuptools": version("setuptools")}


def _containerfile_final_stage() -> str:
    return CONTAINERFILE.split("\nFROM ")[-1]


def test_both_builds_install_with_the_same_recipe() -> None:
    final = _containerfile_final_stage()
    assert "debian:bookworm-slim" in final.splitlines()[0]
    assert "daemonset/image/debian-packages daemonset/image/install-agent" in final
    assert "sh /tmp/image/install-agent /tmp/wheels" in final
    assert 'chroot "$mnt" /bin/sh /tmp/install-agent /tmp/wheels' in SCRIPT
    assert "image_dir/debian-packages" in SCRIPT
    assert "suite=bookworm" in SCRIPT
    # The same wheels: the pins, the build pins (pip), the checkout's nodeagent.
    for recipe in (CONTAINERFILE, SCRIPT):
        assert re.search(r'-r "?(/|\$work/)wheels/requirements.txt', recipe)
        assert "build-requirements.txt" in recipe
        assert "rm -f" in recipe
        assert "setuptools-*.whl" in recipe


def test_both_builds_configure_the_same_env_user_and_entrypoint() -> None:
    final = _containerfile_final_stage()
    env_block = re.search(r"^ENV (.*?)(?=^\S)", final, re.S | re.M)
    assert env_block is not None
    dockerfile_env = sorted(re.findall(r"([A-Z_]+=\S+)", env_block.group(1)))
    script_env = sorted(re.findall(r"--env ([A-Z_]+=\S+)", SCRIPT))
    assert dockerfile_env == script_env
    assert len(script_env) == 3
    (user,) = re.findall(r"^USER (\S+)$", final, re.M)
    assert f"--user {user} " in SCRIPT
    (entry,) = re.findall(r"^ENTRYPOINT (.+)$", final, re.M)
    assert json.loads(entry) == ["nodeagent"]
    assert f"--entrypoint '{entry}'" in SCRIPT
    assert "COPY cni-plugin/mesh-cni /usr/local/share/nodeagent/mesh-cni" in final
    assert '"$here/cni-plugin/mesh-cni" "$mnt/usr/local/share/nodeagent/mesh-cni"' in SCRIPT
