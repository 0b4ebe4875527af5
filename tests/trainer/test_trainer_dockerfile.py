"""The Dockerfile (no Docker engine here): parsed for the properties a cluster image needs."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_base_is_cuda_pytorch_pinned_by_tag():
    froms = [rest for op, rest in instructions() if op == "FROM"]
    assert len(froms) == 1
    image = froms[0].split()[0]
    name, _, tag = image.partition(":")
    assert name == "pytorch/pytorch"
    assert tag and tag != "latest" and "cuda" in tag and re.match(r"\d+\.\d+\.\d+-cuda\d+\.\d+", tag), image


def test_package_is_installed_without_replacing_torch():
    runs = " ".join(rest for op, rest in instructions() if op == "RUN")
    assert re.search(r"pip install [^&]*--constraint \S+ \.(\s|$)", runs)
    assert "torch==" in runs  # the constraint pins the base image's torch
    copied = [shlex.split(rest)[0] for op, rest in instructions() if op == "COPY"]
    pyproject = (REPO / "pyproject.toml").read_text()
    packages = re.findall(r'"(\w+)\*"', re.search(r"\[tool\.setuptools\.packages\.find\]\s*include = \[(.*?)\]",
                                                   pyproject, re.S).group(1))
    assert packages
    for pattern in packages:
        assert pattern.rstrip("*") in copied, f"package {pattern} is not copied into the image"
    assert "pyproject.toml" in " ".join(rest for op, rest in instructions() if op == "COPY")


def test_runs_as_a_non_root_user_with_normlab_entrypoint():
    ops = instructions()
    users = [(i, rest) for i, (op, rest) in enumerate(ops) if op == "USER"]
    assert users, "no USER: the container would run as root"
    last_user_index, user = users[-1]
    assert user not in ("root", "0") and not user.startswith("0:")
    uid = user.split(":")[0]
    created = " ".join(r for op, r in ops if op == "RUN")
    # by name, or by the numeric uid that useradd gave it (numeric ids resolve on any host)
    assert re.search(rf"useradd\b.*(--uid {re.escape(uid)}\b|\b{re.escape(uid)}$)", created, re.M)
    entry = [(i, rest) for i, (op, rest) in enumerate(ops) if op == "ENTRYPOINT"]
    assert len(entry) == 1 and entry[0][0] > last_user_index
    assert json.loads(entry[0][1]) == ["normlab"]
    assert re.search(r"^normlab = ", (REPO / "pyproject.toml").read_text(), re.M)  # the console script
