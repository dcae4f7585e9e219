// init answered "not now" (overloaded, shutting_down, rate_limited: the server's broker is
// away, it is stopping, or it rate-limits) is retried with backoff, keeping the session;
// the broker epoch goes back in init, and a changed epoch resyncs.
import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { connect } from "../backchannel.js";
import { FakeServer, until } from "./fake.mjs";

const NOT_NOW = ["overloaded", "shutting_down", "rate_limited"];

function options(server, states, extra = {}) {
  return {
    WebSocket: server.WebSocket,
    heartbeat: 0,
    backoff: { initial: 5, maximum: 20, factor: 2 },
    onState: (state, info) => states.push([state, info]),
    ...extra,
  };
}

const names = (states) => states.map(([s]) => s);
const inits = (server) => server.messages("init").map((m) => m.content);

describe("init answered not now", () => {
  for (const code of NOT_NOW) {
    it(`${code} before the first connection: reconnects after at least retryAfter`, async () => {
      const server = new FakeServer();
      server.busy = { count: 1, code, retryAfter: 0.05 };
      const states = [];
      const client = await connect("ws://fake.test/ws", options(server, states));
      assert.deepEqual(names(states), ["connecting", "reconnecting", "connected"]);
      const [, info] = states[1];
      assert.equal(info.code, 1000);
      assert.equal(info.reason, `init answered ${code}: not now`);
      assert.ok(info.delay >= 50, `delay ${info.delay} < retryAfter`);
      assert.equal(server.sockets[0].closeCode, 1000); // the client closed the refused one
      assert.equal(inits(server).length, 2);
      assert.ok(inits(server).every((c) => c.sessionId === undefined));
      assert.deepEqual(await client.request("text", { text: "hi" }), { text: "hi", from: "anonymous:2" });
      client.close();
    });

    it(`${code} while resuming: keeps sessionId, lastSeq and epoch for the next init`, async () => {
      const server = new FakeServer();
      const states = [];
      const client = await connect("ws://fake.test/ws", options(server, states));
      await client.request("text", { text: "one" });
      const resume = { sessionId: "s-1", lastSeq: client.lastSeq, epoch: "e1" };
      server.busy = { count: 2, code };
      server.dropAll(1011);
      await until(() => client.state === "resumed");
      const [, second, third, fourth] = inits(server);
      for (const init of [second, third, fourth]) {
        assert.deepEqual({ sessionId: init.sessionId, lastSeq: init.lastSeq, epoch: init.epoch }, resume);
      }
      assert.deepEqual(names(states), [
        "connecting",
        "connected",
        "reconnecting",
        "reconnecting",
        "reconnecting",
        "resumed",
      ]);
      assert.equal(client.sessionId, "s-1");
      client.close();
    });
  }

  it("gives up after maxAttempts: connect() rejects with connect_failed", async () => {
    const server = new FakeServer();
    server.busy = { count: 100, code: "overloaded" };
    const states = [];
    await assert.rejects(
      connect("ws://fake.test/ws", options(server, states, { backoff: { initial: 1, maximum: 2, maxAttempts: 2 } })),
      (error) => error.code === "connect_failed" && /gave up after 2 reconnect attempts/.test(error.message),
    );
    assert.equal(server.sockets.length, 3);
    assert.equal(states.at(-1)[0], "closed");
  });

  it("another init error before the first connection still fails at once", async () => {
    const server = new FakeServer();
    server.refuseInit = "unauthorized";
    await assert.rejects(
      connect("ws://fake.test/ws", options(server, [])),
      (error) => error.code === "unauthorized",
    );
    assert.equal(server.sockets.length, 1);
  });
});

describe("epoch", () => {
  it("goes back in init; a changed epoch (the broker lost its state) resyncs", async () => {
    const server = new FakeServer({ epoch: "e1" });
    const states = [];
    const client = await connect("ws://fake.test/ws", options(server, states));
    assert.equal(client.epoch, "e1");
    server.epoch = "e2";
    server.dropAll(1011);
    await until(() => client.state === "resynced");
    assert.equal(inits(server)[1].epoch, "e1");
    const [, info] = states.at(-1);
    assert.equal(info.reason, "epoch_changed");
    assert.equal(info.previous, "s-1");
    assert.equal(client.epoch, "e2");
    server.dropAll(1011);
    await until(() => client.state === "resumed");
    assert.equal(inits(server)[2].epoch, "e2");
    client.close();
  });
});
