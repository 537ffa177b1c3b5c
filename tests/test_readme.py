"""The README's "Use it from your backend" examples, run against a real server: what the
README shows a user must work as shown."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from roomcast.client import Message, open_room

from servers import ROOT, spawn_server

KEY = "change-me"  # the key the README's examples use


def examples(language: str) -> list[str]:
    readme = (Path(ROOT) / "README.md").read_text()
    section = readme.split("## Use it from your backend", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def test_the_section_has_the_examples_this_test_runs() -> None:
    assert len(examples("python")) == 5
    assert any("open_connection(" in code for code in examples("python"))  # protocol v2
    assert any("since=seq, epoch=epoch" in code for code in examples("python"))  # resume
    assert len(examples("sh")) == 1


def test_the_backend_examples_work_as_written() -> None:
    env = {"ROOMCAST_API_KEY": KEY, "ROOMCAST_RATE_LIMIT": "0"}
    with spawn_server(env=env) as server:
        here = f"127.0.0.1:{server.port}"
        run_env = {**os.environ, "ROOMCAST_API_KEY": KEY}
        for code in examples("python"):
            result = subprocess.run(
                [sys.executable, "-c", code.replace("127.0.0.1:8000", here)],
                capture_output=True,
                text=True,
                timeout=30,
                cwd=ROOT,
                env=run_env,
            )
            assert result.returncode == 0, f"{code}\n{result.stderr}"
        for line in examples("sh")[0].splitlines():
            if not line.startswith("roomcast "):
                continue  # curl: the same request as `roomcast publish`
            command = line.split("#")[0].replace("127.0.0.1:8000", here)
            binary = os.path.join(os.path.dirname(sys.executable), "roomcast")
            result = subprocess.run(
                f"{binary} {command.removeprefix('roomcast ')}",
                shell=True,
                capture_output=True,
                text=True,
                timeout=30,
                env=run_env,
            )
            assert result.returncode == 0, f"{line}\n{result.stderr}"
            assert result.stdout.strip(), line


@pytest.mark.anyio
async def test_the_launcher_serves_the_mounting_example_from_the_project_folder(
    tmp_path: Path, anyio_backend: str
) -> None:
    """The mounting example ("Inside an existing app") saved as ``myproject/asgi.py``,
    served with ``roomcast --app myproject.asgi:app`` from the folder holding
    ``myproject/``, with nothing on PYTHONPATH, as Hypercorn and uvicorn would serve it."""
    (mounting,) = [code for code in examples("python") if 'Mount("/chat"' in code]
    package = tmp_path / "myproject"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "asgi.py").write_text(mounting)
    env = {"PYTHONPATH": ""}
    args = ["--app", "myproject.asgi:app"]
    with spawn_server(args, command="roomcast", cwd=str(tmp_path), env=env) as server:
        with anyio.fail_after(20):
            async with open_room(server.url("/chat"), "lobby", name="ada") as room:
                seq = await room.send("hello from myproject")
                async for event in room:
                    if isinstance(event, Message) and event.seq == seq:
                        assert event.text == "hello from myproject"
                        break
