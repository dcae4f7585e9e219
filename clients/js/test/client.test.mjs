// Request/reply, errors, timeouts, streams, init and close, against the fake server.
import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { BackchannelError, Client, PROTOCOL, connect } from "../backchannel.js";
import { FakeServer, tick, until } from "./fake.mjs";

/** Connect to `server` with fast test settings; `states` records onState calls. */
async function open(server, options = {}) {
  const states = [];
  const client = await connect("ws://fake.test/ws", {
    WebSocket: server.WebSocket,
    heartbeat: 0,
    backoff: { initial: 5, maximum: 20, factor: 2 },
    onState: (state, info) => states.push([state, info]),
    ...options,
  });
  return { client, states };
}

describe("connecting", () => {
  it("offers backchannel.v1 and says init first, with the client's name", async () => {
    const server = new FakeServer();
    const { client, states } = await open(server);
    assert.deepEqual(server.socket.protocols, PROTOCOL);
    const [init] = server.messages();
    assert.equal(init.type, "init");
    assert.deepEqual(init.content, { client: { name: "backchannel.js", version: "0.1.0" } });
    assert.deepEqual(
      states.map(([s]) => s),
      ["connecting", "connected"],
    );
    assert.equal(client.state, "connected");
    assert.equal(client.sessionId, "s-1");
    client.close();
  });

  it("puts the token in init, never in the URL", async () => {
    const server = new FakeServer();
    const { client } = await open(server, { token: "secret-jwt" });
    assert.equal(server.messages("init")[0].content.token, "secret-jwt");
    assert.ok(!server.socket.url.includes("secret"));
    client.close();
  });

  it("asks tokenProvider for a fresh token on every connection", async () => {
    const server = new FakeServer();
    let n = 0;
    const { client } = await open(server, { tokenProvider: async () => `t${++n}` });
    server.dropAll(1011);
    await until(() => client.state === "resumed");
    assert.deepEqual(
      server.messages("init").map((m) => m.content.token),
      ["t1", "t2"],
    );
    client.close();
  });

  it("rejects when the first connection fails, without retrying forever", async () => {
    const server = new FakeServer();
    server.refuse = 1;
    const states = [];
    await assert.rejects(open(server, { onState: (s) => states.push(s) }), (error) => {
      assert.ok(error instanceof BackchannelError);
      assert.equal(error.code, "connect_failed");
      assert.equal(error.clientSide, true);
      assert.match(error.message, /cannot connect to ws:\/\/fake.test\/ws \(1006: refused\)/);
      return true;
    });
    assert.deepEqual(states, ["connecting", "closed"]);
    await tick(30);
    assert.equal(server.sockets.length, 1);
  });

  it("rejects with the server's error when init is refused", async () => {
    const server = new FakeServer();
    server.refuseInit = "unauthorized";
    await assert.rejects(open(server, { token: "bad" }), { code: "unauthorized", clientSide: false });
    assert.equal(server.socket.closeCode, 1000);
  });

  it("needs a WebSocket class", () => {
    const saved = globalThis.WebSocket;
    globalThis.WebSocket = undefined;
    try {
      assert.throws(() => new Client("ws://x/ws"), /WebSocket/);
    } finally {
      globalThis.WebSocket = saved;
    }
  });
});

describe("requests", () => {
  it("resolves with the reply's content", async () => {
    const server = new FakeServer();
    const { client } = await open(server);
    const reply = await client.request("text", { text: "hello" });
    assert.deepEqual(reply, { text: "hello", from: "anonymous:1" });
    const sent = server.messages("text")[0];
    assert.deepEqual(sent.content, { text: "hello" });
    assert.equal(typeof sent.id, "string");
    client.close();
  });

  it("resolves with {} for an ack", async () => {
    const server = new FakeServer();
    server.handlers.noop = () => undefined;
    const { client } = await open(server);
    assert.deepEqual(await client.request("noop"), {});
    client.close();
  });

  it("gives each request its own id and matches answers by replyTo", async () => {
    const server = new FakeServer();
    const { client } = await open(server);
    const replies = await Promise.all(["a", "b", "c"].map((text) => client.request("text", { text })));
    assert.deepEqual(
      replies.map((r) => r.text),
      ["a", "b", "c"],
    );
    const ids = server.messages("text").map((m) => m.id);
    assert.equal(new Set(ids).size, 3);
    client.close();
  });

  it("rejects with a BackchannelError carrying code, details, retryAfter", async () => {
    const server = new FakeServer();
    server.handlers.limited = () => ({
      type: "error",
      content: { code: "rate_limited", message: "slow down", retryAfter: 2.5 },
    });
    server.handlers.strict = () => ({
      type: "error",
      content: {
        code: "validation_failed",
        message: "content.text: missing",
        details: [{ path: "content.text", rule: "missing required property 'text'" }],
      },
    });
    const { client } = await open(server);
    await assert.rejects(client.request("limited"), (error) => {
      assert.ok(error instanceof BackchannelError && error instanceof Error);
      assert.equal(error.code, "rate_limited");
      assert.equal(error.retryAfter, 2.5);
      assert.equal(error.message, "slow down");
      assert.equal(error.clientSide, false);
      return true;
    });
    await assert.rejects(client.request("strict"), (error) => {
      assert.equal(error.code, "validation_failed");
      assert.deepEqual(error.details, [{ path: "content.text", rule: "missing required property 'text'" }]);
      return true;
    });
    await assert.rejects(client.request("nope"), { code: "unknown_type" });
    client.close();
  });

  it("times out client-side and forgets the request (no cancel, as the Python client)", async () => {
    const server = new FakeServer();
    server.handlers.slow = () => "hold";
    const { client } = await open(server);
    const started = Date.now();
    await assert.rejects(client.request("slow", {}, { timeout: 30 }), (error) => {
      assert.equal(error.code, "timeout");
      assert.equal(error.clientSide, true);
      return true;
    });
    assert.ok(Date.now() - started >= 25);
    const [slow] = server.messages("slow");
    server.answer("s-1", slow.id, { type: "slow", content: { late: true } }); // ignored
    assert.deepEqual(await client.request("text", { text: "next" }), { text: "next", from: "anonymous:1" });
    assert.equal(server.messages("cancel").length, 0);
    client.close();
  });

  it("uses the client's default timeout", async () => {
    const server = new FakeServer();
    server.handlers.slow = () => "hold";
    const { client } = await open(server, { timeout: 20 });
    await assert.rejects(client.request("slow"), { code: "timeout" });
    client.close();
  });

  it("refuses a request over maxMessageSize without sending it", async () => {
    const server = new FakeServer();
    const { client } = await open(server, { maxMessageSize: 100 });
    await assert.rejects(client.request("text", { text: "x".repeat(200) }), { code: "too_large" });
    assert.equal(server.messages("text").length, 0);
    client.close();
  });

  it("passes frames that answer nothing to onMessage", async () => {
    const server = new FakeServer();
    const seen = [];
    const { client } = await open(server, { onMessage: (frame) => seen.push(frame) });
    server.push(server.socket, "system", { event: "notice", message: "maintenance at noon" });
    await until(() => seen.length === 1);
    assert.equal(seen[0].type, "system");
    assert.equal(seen[0].content.message, "maintenance at noon");
    client.close();
  });

  it("survives a throwing callback", async () => {
    const server = new FakeServer();
    const errors = console.error;
    console.error = () => {};
    try {
      const { client } = await open(server, {
        onMessage: () => {
          throw new Error("boom");
        },
      });
      server.push(server.socket, "system", { event: "notice", message: "x" });
      await tick(5);
      assert.deepEqual(await client.request("text", { text: "still fine" }), {
        text: "still fine",
        from: "anonymous:1",
      });
      client.close();
    } finally {
      console.error = errors;
    }
  });
});

describe("streams", () => {
  it("yields chunk contents, then ends at the ack", async () => {
    const server = new FakeServer();
    server.handlers.ask = () => ({ chunks: [{ token: "Hel" }, { token: "lo" }] });
    const { client } = await open(server);
    const tokens = [];
    for await (const chunk of client.stream("ask", { q: "?" })) tokens.push(chunk.token);
    assert.deepEqual(tokens, ["Hel", "lo"]);
    client.close();
  });

  it("yields a plain (non-ack) reply as the last item", async () => {
    const server = new FakeServer();
    const { client } = await open(server);
    const items = [];
    for await (const item of client.stream("text", { text: "whole" })) items.push(item);
    assert.deepEqual(items, [{ text: "whole", from: "anonymous:1" }]);
    client.close();
  });

  it("throws the terminal error", async () => {
    const server = new FakeServer();
    server.handlers.ask = () => ({
      type: "error",
      content: { code: "handler_error", message: "failed", ref: "r-1" },
    });
    const { client } = await open(server);
    await assert.rejects(
      (async () => {
        for await (const _ of client.stream("ask")) {
          // nothing arrives
        }
      })(),
      (error) => error.code === "handler_error" && error.ref === "r-1",
    );
    client.close();
  });

  it("cancels on the server when the loop is left early", async () => {
    const server = new FakeServer();
    server.handlers.ask = () => "hold";
    const { client } = await open(server);
    const stream = client.stream("ask");
    await until(() => server.messages("ask").length === 1);
    server.push(server.socket, "chunk", {}); // unrelated frame, ignored
    const session = server.socket.session;
    server._send(session, { type: "chunk", replyTo: stream.id, content: { token: "first" } });
    for await (const chunk of stream) {
      assert.equal(chunk.token, "first");
      break;
    }
    await until(() => server.messages("cancel").length === 1);
    assert.equal(server.messages("cancel")[0].content.target, stream.id);
    client.close();
  });
});

describe("close", () => {
  it("rejects pending requests with closed and reports the closed state", async () => {
    const server = new FakeServer();
    server.handlers.slow = () => "hold";
    const { client, states } = await open(server);
    const pending = client.request("slow");
    await until(() => server.messages("slow").length === 1);
    client.close();
    await assert.rejects(pending, { code: "closed" });
    assert.equal(states.at(-1)[0], "closed");
    assert.equal(server.socket.closeCode, 1000);
    await assert.rejects(client.request("text", { text: "late" }), { code: "closed" });
    await tick(10);
    assert.equal(server.sockets.length, 1, "no reconnect after close()");
  });

  it("stops for good on a fatal close code (4001 unauthorized)", async () => {
    const server = new FakeServer();
    server.handlers.slow = () => "hold";
    const { client, states } = await open(server);
    const pending = client.request("slow");
    await until(() => server.messages("slow").length === 1);
    server.dropAll(4001, "authentication required");
    await assert.rejects(pending, { code: "closed" });
    assert.deepEqual(states.at(-1), ["closed", { code: 4001, reason: "authentication required" }]);
    await tick(30);
    assert.equal(server.sockets.length, 1);
  });

  it("reconnects after 4008 (token expired) when a tokenProvider can bring a new token", async () => {
    const server = new FakeServer();
    let n = 0;
    const { client } = await open(server, { tokenProvider: () => `t${++n}` });
    server.dropAll(4008, "token expired");
    await until(() => client.state === "resumed");
    assert.equal(server.messages("init")[1].content.token, "t2");
    client.close();
  });

  it("treats 4008 (token expired) as fatal without a tokenProvider", async () => {
    const server = new FakeServer();
    const { client } = await open(server, { token: "old" });
    server.dropAll(4008, "token expired");
    await until(() => client.state === "closed");
  });
});
