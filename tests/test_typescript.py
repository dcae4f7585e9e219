"""The JS client's TypeScript declarations, generated from the AsyncAPI document.

``clients/js/contracts.d.ts`` is what ``scripts/generate-types.mjs`` makes of the
committed ``docs/asyncapi.json`` (CI fails when it is stale), and a third-party plugin's
types (a stream, a reply of another type, an undeclared answer) come out typed: code
that misuses them does not compile. ``npm run typecheck`` (in .ci/run) checks the
committed declarations with ``examples/typed.ts``. Needs node and ``npm ci`` in
clients/js: skips locally without them, fails in CI, where ``.ci/run`` installs them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from test_asyncapi import weather_app

from backchannel.asyncapi import document, dumps, registered_types
from conftest import ROOT, node_with

JS = ROOT / "clients" / "js"


def generate(node: str, source: Path) -> str:
    result = subprocess.run(
        [node, "scripts/generate-types.mjs", str(source)],
        cwd=JS,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_committed_declarations_are_generated_from_the_committed_document() -> None:
    """contracts.d.ts == the generator's output for docs/asyncapi.json."""
    generated = generate(node_with("json-schema-to-typescript"), ROOT / "docs" / "asyncapi.json")
    assert generated == (JS / "contracts.d.ts").read_text(), (
        "clients/js/contracts.d.ts is stale: run  cd clients/js && npm run generate"
    )
    assert '"auth.refresh": {' in generated and "export interface JoinReply {" in generated


TYPED = """\
import { connect } from "./backchannel.js";

export async function use(url: string): Promise<void> {
  const client = await connect(url);
  for await (const hour of client.stream("forecast", { city: "Paris" })) {
    const sky: "clear" | "rain" = hour.sky;
    console.log(hour.hour + 1, sky);
  }
  const report = await client.request("weather.now", { city: "Paris" });
  console.log(report.hour + 1);
  const anything = await client.request("undeclared", {});
  console.log(anything["whatever"]);
  // @ts-expect-error: a forecast needs a city
  client.stream("forecast", {});
  // @ts-expect-error: a chunk's hour is a number
  for await (const hour of client.stream("forecast", { city: "Rome" })) hour.hour.trim();
  // @ts-expect-error: weather.now answers a report, which has no city
  console.log((await client.request("weather.now", { city: "Paris" })).city.trim());
}
"""


def test_a_third_party_plugin_gets_typed_declarations(tmp_path: Path) -> None:
    """The document of a server with a third-party plugin, through the generator, with
    backchannel.d.ts: its stream's chunks and its reply are typed, misuse does not compile."""
    node = node_with("json-schema-to-typescript")
    app = weather_app()
    doc = document(registered_types(app), host="localhost:8765", path="/ws", version="0.1.0")
    source = tmp_path / "asyncapi.json"
    source.write_text(dumps(doc))
    (tmp_path / "contracts.d.ts").write_text(generate(node, source))
    shutil.copy(JS / "backchannel.d.ts", tmp_path / "backchannel.d.ts")
    (tmp_path / "package.json").write_text(json.dumps({"type": "module"}))
    (tmp_path / "use.ts").write_text(TYPED)
    config = json.loads((JS / "tsconfig.json").read_text())
    config["files"] = ["backchannel.d.ts", "contracts.d.ts", "use.ts"]
    (tmp_path / "tsconfig.json").write_text(json.dumps(config))
    result = subprocess.run(
        [node, str(JS / "node_modules" / "typescript" / "bin" / "tsc"), "-p", "tsconfig.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    contracts = (tmp_path / "contracts.d.ts").read_text()
    assert '"forecast": {' in contracts and "chunk: ForecastChunk;" in contracts
    assert 'replyType: "weather.report";' in contracts
    assert 'errors: CommonErrorCode | "forbidden";' in contracts
