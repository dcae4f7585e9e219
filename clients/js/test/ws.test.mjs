// The client on Node with the `ws` package (`npm ci` in clients/js installs it), over real
// sockets: a ws server on 127.0.0.1 answers init and echoes requests as backchannel does.
import assert from "node:assert/strict";
import { once } from "node:events";
import { describe, it } from "node:test";

import WebSocket, { WebSocketServer } from "ws";

import { Client, PROTOCOL, connect } from "../backchannel.js";

/**
 * A ws server on a free port; records each handshake's headers and refuses (403) an
 * Origin not in `origins`, as a backchannel server with `server.origins` does.
 * @param {{origins?: string[]}} [options]
 */
async function serve({ origins } = {}) {
  const handshakes = [];
  const wss = new WebSocketServer({
    host: "127.0.0.1",
    port: 0,
    handleProtocols: (offered) => (offered.has(PROTOCOL) ? PROTOCOL : false),
    verifyClient: ({ req }, done) => {
      handshakes.push(req.headers);
      if (origins && !origins.includes(req.headers.origin)) done(false, 403);
      else done(true);
    },
  });
  await once(wss, "listening");
  let seq = 0;
  wss.on("connection", (socket) => {
    socket.on("message", (data) => {
      const request = JSON.parse(String(data));
      const answer =
        request.type === "init"
          ? { type: "init", content: { sessionId: "s-1", resumed: false, missed: 0 } }
          : { type: request.type, content: request.content };
      seq += 1;
      socket.send(JSON.stringify({ id: `f${seq}`, replyTo: request.id, seq, ...answer }));
    });
  });
  return {
    url: `ws://127.0.0.1:${wss.address().port}/ws`,
    handshakes,
    close: () =>
      new Promise((resolve) => {
        for (const socket of wss.clients) socket.terminate();
        wss.close(resolve);
      }),
  };
}

/** Run `body` with `globalThis.WebSocket` replaced by `value` (undefined: removed). */
function withGlobalWebSocket(value, body) {
  const saved = Object.getOwnPropertyDescriptor(globalThis, "WebSocket");
  if (value === undefined) delete globalThis.WebSocket;
  else Object.defineProperty(globalThis, "WebSocket", { value, configurable: true, writable: true });
  try {
    return body();
  } finally {
    delete globalThis.WebSocket;
    if (saved) Object.defineProperty(globalThis, "WebSocket", saved);
  }
}

describe("on Node with the ws package", () => {
  it("connects, offers backchannel.v1 and sends origin and headers in the handshake", async () => {
    const server = await serve({ origins: ["https://chat.test"] });
    const client = await connect(server.url, {
      WebSocket,
      origin: "https://chat.test",
      headers: { "X-Trace": "t-1" },
      heartbeat: 0,
    });
    try {
      assert.deepEqual(await client.request("text", { text: "hi" }), { text: "hi" });
      const [headers] = server.handshakes;
      assert.equal(headers.origin, "https://chat.test");
      assert.equal(headers["x-trace"], "t-1");
      assert.equal(headers["sec-websocket-protocol"], PROTOCOL);
    } finally {
      client.close();
      await server.close();
    }
  });

  it("a refused handshake (403) names the Origin allow-list and the origin option", async () => {
    const server = await serve({ origins: ["https://chat.test"] });
    try {
      await assert.rejects(connect(server.url, { WebSocket, heartbeat: 0 }), (error) => {
        assert.equal(error.code, "connect_failed");
        assert.match(error.message, /Unexpected server response: 403/);
        assert.match(error.message, /server\.origins\) does not list this client's Origin \(none sent\)/);
        return true;
      });
      const other = { WebSocket, heartbeat: 0, origin: "https://evil.test" };
      await assert.rejects(connect(server.url, other), /Origin \("https:\/\/evil\.test"\)/);
    } finally {
      await server.close();
    }
  });

  it("without a WebSocket class, the error says to install and pass ws", () => {
    withGlobalWebSocket(undefined, () => {
      assert.throws(
        () => new Client("ws://127.0.0.1:1/ws"),
        /no WebSocket class: .*npm install ws.*import WebSocket from "ws"; connect\(url, \{ WebSocket \}\)/,
      );
    });
  });

  it("origin with a WebSocket class that cannot send it is refused at once", () => {
    class BrowserLike {}
    withGlobalWebSocket(BrowserLike, () => {
      assert.throws(
        () => new Client("ws://127.0.0.1:1/ws", { origin: "https://chat.test" }),
        /origin and headers need a WebSocket class that sends them, e.g. the ws package/,
      );
    });
  });
});
