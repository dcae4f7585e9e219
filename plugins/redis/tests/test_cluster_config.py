"""Cluster mode's one setting (issue 15): the example docs/scaling.md shows passes
``backchannel check`` and serves on a real Redis Cluster; ``check`` refuses a setting
cluster mode cannot use, naming it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from backchannel_redis.testing import RedisCluster, fresh_prefix
from instances import BOUND, Instance

from backchannel.client import Client

#: the private cluster fixtures (redis_cluster_process, redis_cluster)
pytest_plugins = ["redis_fixtures"]

SCALING = Path(__file__).parents[3] / "docs" / "scaling.md"
BACKCHANNEL = Path(sys.executable).with_name("backchannel")


def cluster_example() -> str:
    """The TOML block of docs/scaling.md that turns cluster mode on."""
    blocks = re.findall(r"```toml\n(.*?)```", SCALING.read_text(), re.S)
    (block,) = [b for b in blocks if re.search(r"^cluster = true", b, re.M)]
    return str(block)


def check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "backchannel.toml"
    path.write_text(text)
    return subprocess.run(
        [str(BACKCHANNEL), "check", str(path)], capture_output=True, text=True, timeout=60
    )


def test_the_docs_cluster_example_passes_check(tmp_path: Path) -> None:
    result = check(tmp_path, cluster_example())
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(
        ": OK (plugins: init, text, ping, system, validation, rooms, redis)\n"
    )


@pytest.mark.parametrize(
    ("setting", "line"),
    [
        ('cluster = "yes"', "plugins.redis.cluster: must be of type boolean"),
        (
            'cluster = true\nurl = "unix:///run/redis.sock"',
            "plugins.redis.url: does not match ^rediss?://",
        ),
    ],
    ids=["not-a-boolean", "unix-socket"],
)
def test_check_refuses_what_cluster_mode_cannot_use(
    tmp_path: Path, setting: str, line: str
) -> None:
    text = '[plugins]\nenabled = ["init", "text", "redis"]\n\n[plugins.redis]\n' + setting + "\n"
    result = check(tmp_path, text)
    assert (result.returncode, result.stderr) == (1, f"backchannel: invalid config: {line}\n")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_the_docs_cluster_example_serves_on_a_cluster(
    redis_cluster: RedisCluster, tmp_path: Path
) -> None:
    """``serve`` with the example (its url pointed at a private cluster): ready, and a
    room message reaches a member and is answered, over a real socket."""
    text = cluster_example()
    text = re.sub(r'^url = ".*?"', f'url = "{redis_cluster.url}"', text, flags=re.M)
    text = re.sub(r'^key_prefix = ".*?"', f'key_prefix = "{fresh_prefix()}"', text, flags=re.M)
    instance = Instance("example", tmp_path, text)
    instance.start()
    try:
        await instance.wait_ready()
        with anyio.fail_after(BOUND):
            async with Client(instance.url) as client:
                room = client.subscribe("lobby")
                reply = await client.request("text", {"room": "lobby", "text": "hi"})
                async for item in room:
                    assert isinstance(item, dict), item
                    assert (item["text"], item["offset"]) == ("hi", reply["offset"])
                    break
    except BaseException:
        print(instance.tail())
        raise
    finally:
        instance.stop()
