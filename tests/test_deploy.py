"""The deployment files: the Dockerfile's steps run, compose.yaml and nginx hold together.

No container engine runs here, so the Dockerfile is read instruction by instruction and
its steps are run as a container would run them, in a copy of the repository and a fresh
venv, with the image's paths moved into a temporary directory: the build stage's RUN
(``uv build`` of every wheel), the run stage's RUN (a venv, the wheels installed with
pip), its CMD (``backchannel serve`` with the config it COPYs), and its HEALTHCHECK
against the server that CMD started. ``useradd`` is the one RUN left out (it needs root
and changes this machine); the test checks the USER it makes instead. compose.yaml is
checked by loading it: two instances sharing the Redis service, nginx in front with
``deploy/nginx.conf``, which is the config docs/scaling.md shows.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from backchannel import App
from conftest import ROOT, serve_process
from test_packaging import clean_env, copy_checkout, run

DOCKERFILE = ROOT / "Dockerfile"
SECRET = "x" * 43  # CHAT_JWT_SECRET, as a deployment would set it (32 random bytes, base64)


def instructions(text: str) -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments): comments dropped,
    continuation lines joined."""
    found: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).strip().partition(" ")
        found.append((keyword.upper(), arguments.strip()))
        pending = ""
    return found


def stages() -> list[list[tuple[str, str]]]:
    """The instructions of each stage (each starts with its FROM)."""
    result: list[list[tuple[str, str]]] = []
    for keyword, arguments in instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            result.append([])
        result[-1].append((keyword, arguments))
    return result


def moved(text: str, paths: dict[str, Path]) -> str:
    """``text`` with the image's paths replaced by their temporary places."""
    for image_path, here in paths.items():
        text = re.sub(re.escape(image_path) + r"(?=[/\s'\":]|$)", str(here), text)
    return text


def test_the_dockerfile_is_multi_stage_non_root_and_checks_readyz() -> None:
    build, final = stages()
    assert build[0] == ("FROM", "python:3.12-slim AS build")
    assert final[0] == ("FROM", "python:3.12-slim")
    assert ("RUN", "uv build --all-packages --wheel --out-dir /wheels") in build
    keywords = [keyword for keyword, _ in final]
    assert keywords.index("USER") > keywords.index("RUN")  # installs as root, runs as not
    assert ("USER", "backchannel") in final
    users = [arg for kw, arg in final if kw == "RUN" and arg.startswith("useradd ")]
    assert len(users) == 1 and users[0].endswith(" backchannel")
    (check,) = [arg for kw, arg in final if kw == "HEALTHCHECK"]
    assert "/readyz" in check
    (cmd,) = [arg for kw, arg in final if kw == "CMD"]
    assert json.loads(cmd)[:2] == ["backchannel", "serve"]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The Dockerfile's build and run stages, run here: returns the moved paths, the
    environment of the image, its CMD and its HEALTHCHECK command."""
    uv = shutil.which("uv")
    assert uv is not None, "uv is needed (the image copies it from the uv image)"
    tmp = tmp_path_factory.mktemp("image")
    paths = {
        "/wheels": tmp / "wheels",
        "/opt/backchannel": tmp / "opt" / "backchannel",
        "/etc/backchannel": tmp / "etc" / "backchannel",
        "/src": tmp / "src",
    }
    env = clean_env()
    build, final = stages()
    for keyword, arguments in build[1:]:
        if keyword == "COPY" and arguments.startswith("--from="):
            continue  # uv itself: this test uses the uv on PATH
        if keyword == "WORKDIR":
            workdir = paths[arguments]
        elif keyword == "COPY":
            assert arguments == ". .", arguments
            copy_checkout(workdir)
        elif keyword == "RUN":
            run(["bash", "-euo", "pipefail", "-c", moved(arguments, paths)], workdir, env)
        else:
            pytest.fail(f"the test does not know how to run {keyword} {arguments}")
    healthcheck: list[str] = []
    cmd: list[str] = []
    for keyword, arguments in final[1:]:
        if keyword == "ENV":
            for assignment in shlex.split(arguments):
                name, _, value = assignment.partition("=")
                env[name] = moved(value, paths).replace("$PATH", env["PATH"])
        elif keyword == "COPY" and arguments.startswith("--from="):
            continue  # the build stage's /wheels: already in place
        elif keyword == "COPY":
            source, target = arguments.split()
            destination = Path(moved(target, paths))
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / source, destination)
        elif keyword == "RUN" and not arguments.startswith("useradd "):
            run(["bash", "-euo", "pipefail", "-c", moved(arguments, paths)], tmp, env)
        elif keyword == "HEALTHCHECK":
            healthcheck = json.loads(moved(arguments.split(" CMD ", 1)[1], paths))
        elif keyword == "CMD":
            cmd = json.loads(moved(arguments, paths))
    assert not (tmp / "wheels").exists(), "the run stage removes the wheels it installed"
    return {"env": env, "cmd": cmd, "healthcheck": healthcheck, "venv": paths["/opt/backchannel"]}


@pytest.mark.slow
def test_the_image_has_the_kernel_and_every_standard_plugin(image: dict[str, Any]) -> None:
    rows = json.loads(run([image["venv"] / "bin" / "backchannel", "plugins"], ROOT, image["env"]))
    names = {row["name"] for row in rows}
    assert {"init", "text", "ping", "system", "rooms", "jwt", "redis", "monitoring"} <= names
    python = image["venv"] / "bin" / "python"
    assert run(
        [python, "-c", "import backchannel; print(backchannel.__file__)"], ROOT, image["env"]
    )
    run([python, "-c", "import uvloop"], ROOT, image["env"])  # backchannel[uvloop]


def healthcheck(image: dict[str, Any], port: int) -> subprocess.CompletedProcess[str]:
    env = image["env"] | {"BACKCHANNEL_SERVER__PORT": str(port)}
    return subprocess.run(
        image["healthcheck"], env=env, capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.slow
@pytest.mark.anyio
async def test_the_image_command_serves_and_its_healthcheck_passes(
    image: dict[str, Any], anyio_backend: str
) -> None:
    """The CMD (``backchannel serve`` with the production config, on asyncio with uvloop as
    in the image, a JWT secret set as a deployment sets it) answers /readyz, the HEALTHCHECK
    passes against it, and fails when nothing listens."""
    env = image["env"] | {
        "CHAT_JWT_SECRET": SECRET,
        "BACKCHANNEL_SERVER__PORT": "0",
        "BACKCHANNEL_SERVER__HOST": "127.0.0.1",  # the image listens on 0.0.0.0; not here
    }
    async with serve_process(image["cmd"], env, cwd=image["venv"], timeout=60) as served:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{served.port}") as http:
            ready = await http.get("/readyz")
            assert ready.status_code == 200 and ready.json()["ready"] is True
            contract = (await http.get("/asyncapi.json")).json()
            assert "auth.refresh" in contract["operations"]
        result = healthcheck(image, served.port)
        assert result.returncode == 0, result.stderr
    assert b'"level":"INFO"' in served.log or b'"level": "INFO"' in served.log  # json logs
    assert healthcheck(image, served.port).returncode != 0  # stopped: the check fails


# ------------------------------------------------------------------ compose and nginx


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def test_compose_runs_two_instances_on_one_redis_behind_nginx() -> None:
    """Two instances of the image sharing the redis service, with a config the App accepts
    (the production config plus redis, from the environment); nginx in front with
    deploy/nginx.conf, its address the one the instances trust for X-Forwarded-For."""
    services = compose()["services"]
    assert set(services) == {"chat1", "chat2", "redis", "nginx"}
    for name in ("chat1", "chat2"):
        chat = services[name]
        assert chat["build"] == "." and chat["depends_on"]["redis"]["condition"] == (
            "service_healthy"
        )
        environ = {k: str(v) for k, v in chat["environment"].items()}
        assert environ["BACKCHANNEL_PLUGINS__REDIS__URL"] == "redis://redis:6379/0"
        environ["CHAT_JWT_SECRET"] = SECRET
        app = App(ROOT / "backchannel.production.toml", environ=environ)
        assert "redis" in app.config["plugins"]["enabled"]
        assert app.config["server"]["host"] == "0.0.0.0"
        grace = app.settings.shutdown.grace
        assert int(chat["stop_grace_period"].rstrip("s")) > grace + 5
        nginx_address = services["nginx"]["networks"]["default"]["ipv4_address"]
        proxies = app.plugin_config("ratelimit")["trusted_proxies"]
        assert proxies == [f"{nginx_address}/32"]
    subnet = compose()["networks"]["default"]["ipam"]["config"][0]["subnet"]
    assert nginx_address.rsplit(".", 1)[0] == subnet.rsplit(".", 1)[0]
    assert services["redis"]["image"].startswith("redis:7")
    (volume,) = services["nginx"]["volumes"]
    source, target, _ = volume.split(":")
    assert (ROOT / source).resolve() == ROOT / "deploy" / "nginx.conf"
    assert target == "/etc/nginx/conf.d/default.conf"
    upstream = re.findall(r"^\s*server (\S+);", (ROOT / source).read_text(), re.M)
    assert upstream == ["chat1:8765", "chat2:8765"]


def test_the_nginx_config_is_the_one_the_scaling_guide_shows() -> None:
    text = (ROOT / "docs" / "scaling.md").read_text()
    (block,) = re.findall(r"```nginx\n(.*?)```", text, re.S)
    shown = "".join(line.removeprefix("  ") for line in block.splitlines(True)).rstrip(" ")
    assert shown == (ROOT / "deploy" / "nginx.conf").read_text()
