// Reconnect with backoff and full jitter, resume, resend with the same ids,
// replay dedupe by seq, heartbeat, and rooms re-joined with `since`.
import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { Client, connect } from "../backchannel.js";
import { FakeServer, tick, until } from "./fake.mjs";

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

const names = (states) => states.map(([s]) => s);

describe("backoff", () => {
  it("waits random() * min(maximum, initial * factor^(n-1)) before attempt n", async () => {
    const server = new FakeServer();
    const { client, states } = await open(server, {
      backoff: { initial: 4, maximum: 40, factor: 3 },
      random: () => 0.5,
    });
    server.refuse = 6;
    server.dropAll(1011);
    await until(() => client.state === "resumed");
    const waits = states.filter(([s]) => s === "reconnecting").map(([, i]) => [i.attempt, i.delay]);
    // caps 4, 12, 36, 40, 40, 40, 40 (the maximum holds), halved by the pinned random
    assert.deepEqual(waits, [
      [1, 2],
      [2, 6],
      [3, 18],
      [4, 20],
      [5, 20],
      [6, 20],
      [7, 20],
    ]);
    assert.equal(server.sockets.length, 8);
    client.close();
  });

  it("gives up after maxAttempts reconnect attempts in a row", async () => {
    const server = new FakeServer();
    server.handlers.slow = () => "hold";
    const { client, states } = await open(server, { backoff: { initial: 2, maximum: 4, maxAttempts: 3 } });
    const pending = client.request("slow");
    await until(() => server.messages("slow").length === 1);
    server.refuse = 100;
    server.dropAll(1011);
    await assert.rejects(
      pending,
      (error) => error.code === "closed" && /gave up after 3/.test(error.message),
    );
    assert.equal(states.filter(([s]) => s === "reconnecting").length, 3);
    assert.equal(states.at(-1)[0], "closed");
    assert.equal(server.sockets.length, 4);
  });

  it("keeps every jittered delay within [0, cap]", () => {
    const client = new Client("ws://fake.test/ws", {
      WebSocket: new FakeServer().WebSocket,
      backoff: { initial: 100, maximum: 10000, factor: 2 },
    });
    for (let attempt = 1; attempt <= 20; attempt++) {
      const cap = Math.min(10000, 100 * 2 ** (attempt - 1));
      const delays = Array.from({ length: 200 }, () => client.backoffDelay(attempt));
      assert.ok(
        delays.every((d) => d >= 0 && d <= cap),
        `attempt ${attempt}: ${Math.max(...delays)} > ${cap}`,
      );
      if (attempt >= 3) {
        // full jitter spreads over the whole range, not around the cap
        assert.ok(Math.min(...delays) < cap / 4 && Math.max(...delays) > (3 * cap) / 4, `attempt ${attempt}`);
      }
    }
    client.close();
  });

  it("pins the bounds with random at its extremes", () => {
    let r = 0;
    const client = new Client("ws://fake.test/ws", {
      WebSocket: new FakeServer().WebSocket,
      backoff: { initial: 100, maximum: 1000, factor: 2 },
      random: () => r,
    });
    assert.equal(client.backoffDelay(1), 0);
    r = 0.999999;
    assert.deepEqual(
      [1, 2, 3, 4, 5, 9].map((n) => client.backoffDelay(n)),
      [99, 199, 399, 799, 999, 999],
    );
    client.close();
  });

  it("starts over from the first delay after a successful connection", async () => {
    const server = new FakeServer();
    const { client, states } = await open(server, { random: () => 0.99 });
    server.refuse = 2;
    server.dropAll(1011);
    await until(() => client.state === "resumed");
    server.dropAll(1011);
    await until(() => states.filter(([s]) => s === "resumed").length === 2);
    const attempts = states.filter(([s]) => s === "reconnecting").map(([, i]) => i.attempt);
    assert.deepEqual(attempts, [1, 2, 3, 1]);
    client.close();
  });

  it("reports the close code and reason of the lost connection", async () => {
    const server = new FakeServer();
    const { client, states } = await open(server);
    server.dropAll(1001, "going away");
    await until(() => client.state === "resumed");
    const [, info] = states.find(([s]) => s === "reconnecting");
    assert.equal(info.code, 1001);
    assert.equal(info.reason, "going away");
    client.close();
  });
});

describe("resume and resend", () => {
  it("resumes with init {sessionId, lastSeq, epoch} and reports missed", async () => {
    const server = new FakeServer();
    const { client, states } = await open(server, { token: "jwt" });
    await client.request("text", { text: "one" });
    const lastSeq = client.lastSeq;
    assert.equal(lastSeq, 2); // init answer, then the text reply
    server.dropAll(1011);
    server.push({ session: server.sessions.get("s-1") }, "system", {
      event: "notice",
      message: "while away",
    });
    await until(() => client.state === "resumed");
    const init = server.messages("init")[1];
    assert.deepEqual(init.content, {
      client: { name: "backchannel.js", version: "0.1.0" },
      sessionId: "s-1",
      lastSeq,
      epoch: "e1",
      token: "jwt",
    });
    assert.deepEqual(names(states), ["connecting", "connected", "reconnecting", "resumed"]);
    assert.deepEqual(states.at(-1)[1], { sessionId: "s-1", missed: 1 });
    assert.equal(client.sessionId, "s-1");
    client.close();
  });

  it("re-sends an unanswered request with the same id; the handler runs once", async () => {
    const server = new FakeServer();
    server.handlers.work = () => "hold";
    const { client } = await open(server);
    const pending = client.request("work", { n: 1 });
    await until(() => server.messages("work").length === 1);
    const id = server.messages("work")[0].id;
    server.dropAll(1011);
    await until(() => server.messages("work").length === 2);
    assert.deepEqual(
      server.messages("work").map((m) => [m.id, m.content]),
      [
        [id, { n: 1 }],
        [id, { n: 1 }],
      ],
    );
    server.answer("s-1", id, { type: "work", content: { done: true } });
    assert.deepEqual(await pending, { done: true });
    assert.equal(server.executions.get(id), 1);
    client.close();
  });

  it("takes an answer produced while disconnected from the replay, without re-sending", async () => {
    const server = new FakeServer();
    server.handlers.work = () => "hold";
    const { client } = await open(server);
    const pending = client.request("work");
    await until(() => server.messages("work").length === 1);
    const id = server.messages("work")[0].id;
    server.dropAll(1011);
    server.answer("s-1", id, { type: "work", content: { done: 1 } }); // goes to the outbox
    assert.deepEqual(await pending, { done: 1 });
    await tick(5);
    assert.equal(server.messages("work").length, 1);
    client.close();
  });

  it("re-sends when the reply was lost and the session could not be resumed", async () => {
    const server = new FakeServer({ resume: false }); // no replay: only the retry can answer
    const { client, states } = await open(server);
    let drop = true;
    server.handlers.work = (c, session) => {
      if (drop) server.dropAll(1011); // the answer is produced, but the connection is gone
      drop = false;
      return { type: "work", content: { session: session.id } };
    };
    const reply = await client.request("work");
    const [first, second] = server.messages("work");
    assert.equal(first.id, second.id);
    // without resume the retry lands in a new session, which runs the handler again:
    // the client cannot do better, and reports "resynced" so the app knows
    assert.equal(reply.session, "s-2");
    assert.ok(names(states).includes("resynced"));
    client.close();
  });

  it("sends requests made while reconnecting after init, in order", async () => {
    const server = new FakeServer();
    const { client } = await open(server);
    server.refuse = 1;
    server.dropAll(1011);
    await until(() => client.state === "reconnecting");
    const replies = Promise.all(["a", "b", "c"].map((text) => client.request("text", { text })));
    await until(() => client.state === "resumed");
    assert.deepEqual(
      (await replies).map((r) => r.text),
      ["a", "b", "c"],
    );
    const order = server.received.filter((r) => r.socket === server.socket).map((r) => r.message.type);
    assert.deepEqual(order, ["init", "text", "text", "text"]);
    client.close();
  });

  it("starts a new session when resuming is refused (forbidden) and re-sends there", async () => {
    const server = new FakeServer();
    server.handlers.slow = () => "hold";
    const { client, states } = await open(server);
    const pending = client.request("slow");
    await until(() => server.messages("slow").length === 1);
    server.refuseResume = "forbidden";
    server.dropAll(1011);
    await until(() => client.state === "resynced");
    const inits = server
      .messages("init")
      .slice(1)
      .map((m) => m.content.sessionId);
    assert.deepEqual(inits, ["s-1", undefined]); // resume refused, then a fresh init
    assert.deepEqual(states.at(-1)[1], { sessionId: "s-2", previous: "s-1", reason: "forbidden", resent: 1 });
    assert.equal(server.messages("slow").length, 2);
    server.answer("s-2", server.messages("slow")[1].id, { type: "slow", content: { ok: 1 } });
    assert.deepEqual(await pending, { ok: 1 });
    client.close();
  });

  for (const reason of ["trimmed", "evicted"]) {
    it(`starts a new session when its session was ${reason} and re-sends there`, async () => {
      // evicted: the server let the session go to stay within session.total_max_bytes
      const server = new FakeServer({ resume: false, notResumed: reason });
      server.handlers.slow = () => "hold";
      const { client, states } = await open(server);
      const pending = client.request("slow");
      await until(() => server.messages("slow").length === 1);
      server.dropAll(1011);
      await until(() => client.state === "resynced");
      assert.deepEqual(states.at(-1)[1], { sessionId: "s-2", previous: "s-1", reason, resent: 1 });
      const [first, again] = server.messages("slow");
      assert.equal(again.id, first.id); // the same id: a retry, should the server know it
      server.answer("s-2", again.id, { type: "slow", content: { ok: 1 } });
      assert.deepEqual(await pending, { ok: 1 });
      client.close();
    });
  }

  it("drops replayed frames it already saw (seq <= lastSeq)", async () => {
    const server = new FakeServer();
    server.replayOverlap = 3; // the server replays 3 frames too many
    const notices = [];
    const { client } = await open(server, { onMessage: (f) => notices.push(f.content.message) });
    for (const message of ["n1", "n2", "n3"])
      server.push(server.socket, "system", { event: "notice", message });
    await until(() => notices.length === 3);
    server.dropAll(1011);
    server.push({ session: server.sessions.get("s-1") }, "system", { event: "notice", message: "n4" });
    await until(() => client.state === "resumed");
    await tick(5);
    assert.deepEqual(notices, ["n1", "n2", "n3", "n4"]);
    client.close();
  });

  it("starts counting seq again in a new session (resynced)", async () => {
    const server = new FakeServer({ resume: false });
    const notices = [];
    const { client, states } = await open(server, { onMessage: (f) => notices.push(f.content.message) });
    for (const message of ["a", "b", "c", "d"])
      server.push(server.socket, "system", { event: "notice", message });
    await until(() => notices.length === 4);
    assert.equal(client.lastSeq, 5);
    server.dropAll(1011);
    await until(() => client.state === "resynced");
    assert.deepEqual(states.at(-1)[1], {
      sessionId: "s-2",
      previous: "s-1",
      reason: "unknown_session",
      resent: 0,
    });
    assert.equal(client.sessionId, "s-2");
    server.push(server.socket, "system", { event: "notice", message: "new session, seq 2" });
    await until(() => notices.length === 5);
    assert.equal(client.lastSeq, 2);
    client.close();
  });

  it("fails a half-received stream whose session is gone instead of repeating it", async () => {
    const server = new FakeServer({ resume: false });
    server.handlers.ask = () => "hold";
    const { client } = await open(server);
    const stream = client.stream("ask");
    await until(() => server.messages("ask").length === 1);
    server._send(server.socket.session, { type: "chunk", replyTo: stream.id, content: { t: 1 } });
    assert.deepEqual((await stream.next()).value, { t: 1 });
    server.dropAll(1011);
    await assert.rejects(stream.next(), { code: "interrupted" });
    client.close();
  });
});

describe("heartbeat", () => {
  it("pings every interval and stays connected while pongs come back", async () => {
    const server = new FakeServer();
    const { client, states } = await open(server, { heartbeat: 15 });
    await until(() => server.messages("ping").length >= 4);
    assert.equal(server.sockets.length, 1);
    assert.ok(!names(states).includes("reconnecting"));
    assert.equal(typeof client.latency, "number");
    assert.equal(typeof server.messages("ping")[0].content.clientTime, "number");
    client.close();
  });

  it("reconnects when no pong comes within the interval", async () => {
    const server = new FakeServer();
    server.silent.add("ping");
    const { client, states } = await open(server, { heartbeat: 15 });
    await until(() => client.state === "resumed");
    const lost = states.find(([s]) => s === "reconnecting")[1];
    assert.equal(lost.code, 4000);
    assert.match(lost.reason, /no pong/);
    assert.equal(server.sockets[0].closeCode, 4000);
    client.close();
  });

  it("does not resend its pings after a reconnect", async () => {
    const server = new FakeServer();
    server.silent.add("ping");
    const { client } = await open(server, { heartbeat: 10 });
    await until(() => server.sockets.length >= 2 && client.state === "resumed");
    const second = server.received.filter((r) => r.socket === server.sockets[1]).map((r) => r.message);
    assert.equal(second[0].type, "init");
    assert.ok(second.slice(1).every((m) => m.type === "ping"));
    assert.ok(new Set(server.messages("ping").map((m) => m.id)).size === server.messages("ping").length);
    client.close();
  });
});

describe("rooms", () => {
  it("joins, publishes, receives members' messages once and in order", async () => {
    const server = new FakeServer();
    const a = [];
    const b = [];
    const { client: alice } = await open(server);
    const { client: bob } = await open(server);
    const roomA = await alice.subscribe("lobby", (m) => a.push(m.text));
    await bob.subscribe("lobby", (m) => b.push(m.text));
    const sent = await roomA.publish("hi bob");
    assert.deepEqual(sent, { room: "lobby", offset: 1, epoch: "e1", from: "anonymous:1", text: "hi bob" });
    await until(() => b.length === 1);
    assert.deepEqual(a, ["hi bob"]); // own messages come through onMessage too, once
    assert.deepEqual(b, ["hi bob"]);
    alice.close();
    bob.close();
  });

  it("tracks presence", async () => {
    const server = new FakeServer();
    const { client: alice } = await open(server);
    const { client: bob } = await open(server);
    const events = [];
    const room = await alice.subscribe("lobby", () => {}, {
      onPresence: (members, event) => events.push(event),
    });
    assert.deepEqual(room.members, ["anonymous:1"]);
    await bob.subscribe("lobby", () => {});
    await until(() => room.members.length === 2);
    assert.deepEqual(room.members, ["anonymous:1", "anonymous:2"]);
    assert.deepEqual(events.at(-1), { room: "lobby", event: "join", member: "anonymous:2" });
    assert.deepEqual(await alice.presence("lobby"), ["anonymous:1", "anonymous:2"]);
    alice.close();
    bob.close();
  });

  it("re-joins with since after a reconnect and gets what it missed, once", async () => {
    for (const resume of [true, false]) {
      const server = new FakeServer({ resume });
      const a = [];
      const { client: alice } = await open(server);
      const { client: bob } = await open(server);
      await alice.subscribe("lobby", (m) => a.push(`${m.offset}:${m.text}`));
      const roomB = await bob.subscribe("lobby", () => {});
      await roomB.publish("one");
      await until(() => a.length === 1);
      server.refuse = 1;
      alice._conn.ws.readyState = 3; // alice's socket dies quietly...
      alice._conn.ws.onclose({ code: 1006, reason: "" }); // ...and her browser notices
      await roomB.publish("two");
      await roomB.publish("three");
      await until(() => a.length === 3);
      await tick(10);
      assert.deepEqual(a, ["1:one", "2:two", "3:three"], `resume=${resume}`);
      // resumed or not, room messages are in no outbox: the re-join's replay brings 2 and 3
      const joins = server.messages("join").filter((m) => m.content.since);
      const since = { offset: 1, epoch: "e1" };
      assert.deepEqual(joins.at(-1).content, { room: "lobby", since });
      assert.equal(alice.state, resume ? "resumed" : "resynced");
      alice.close();
      bob.close();
    }
  });

  it("re-sends a publish that got no answer, and shows it once", async () => {
    const server = new FakeServer();
    const a = [];
    const { client: alice } = await open(server);
    const room = await alice.subscribe("lobby", (m) => a.push(m.text));
    const publish = server.handlers.text;
    server.handlers.text = (c, s) => {
      server.dropAll(1011); // published, but the reply is lost with the connection
      server.handlers.text = publish;
      return publish(c, s);
    };
    const sent = await room.publish("hello");
    assert.equal(sent.offset, 1);
    await tick(10);
    assert.deepEqual(a, ["hello"]);
    assert.equal(server.rooms.get("lobby").history.length, 1, "published once");
    alice.close();
  });

  it("signals a gap when the room's history cannot cover it", async () => {
    const server = new FakeServer({ resume: false });
    const gaps = [];
    const a = [];
    const { client: alice } = await open(server);
    const { client: bob } = await open(server);
    await alice.subscribe("lobby", (m) => a.push(m.text), { onGap: (info) => gaps.push(info) });
    const roomB = await bob.subscribe("lobby", () => {});
    await roomB.publish("before");
    await until(() => a.length === 1);
    const room = server.rooms.get("lobby");
    room.epoch = "e2"; // the broker lost the room's history
    room.history = [];
    server.sockets[0].readyState = 3;
    server.sockets[0].onclose({ code: 1006, reason: "" });
    await until(() => gaps.length === 1);
    assert.deepEqual(gaps[0], { room: "lobby", missed: undefined, epoch: "e2", reason: "not_recovered" });
    alice.close();
    bob.close();
  });
  it("takes messages from room frames only, holding early ones behind its join's gap", async () => {
    const server = new FakeServer({ resume: false });
    const seen = [];
    const { client: alice } = await open(server);
    const room = await alice.subscribe("lobby", (m) => seen.push(`${m.epoch}/${m.offset}`), {
      onGap: (info) => seen.push(`gap ${info.reason} ${info.epoch}`),
    });
    const publish = server.handlers.text;
    server.handlers.text = (c, s) => {
      server.handlers.text = publish;
      const { live } = server.rooms.get("lobby");
      const members = [...live];
      live.clear(); // the room frame goes nowhere: a reply alone
      const reply = publish(c, s);
      for (const [session, socket] of members) live.set(session, socket);
      return reply;
    };
    const sent = await room.publish("mine");
    await tick(10);
    assert.deepEqual(seen, []); // the reply settles publish(); it is no room message
    server.roomFrame(server.socket, "text", sent);
    await until(() => seen.length === 1);
    assert.deepEqual(seen, ["e1/1"]);
    const lobby = server.rooms.get("lobby");
    lobby.epoch = "e2"; // the broker lost the room's history
    lobby.history = [];
    const join = server.handlers.join;
    server.handlers.join = (c, s, m, socket) => {
      // a live message of the new epoch overtakes the join's answer
      server.roomFrame(socket, "text", { room: "lobby", offset: 1, epoch: "e2", from: "x", text: "n" });
      return join(c, s, m, socket);
    };
    server.dropAll(1011);
    await until(() => seen.length === 3);
    assert.deepEqual(seen, ["e1/1", "gap not_recovered e2", "e2/1"]);
    alice.close();
  });

  it("signals a gap when a live message comes from a new epoch", async () => {
    const server = new FakeServer();
    const gaps = [];
    const a = [];
    const { client: alice } = await open(server);
    await alice.subscribe("lobby", (m) => a.push(`${m.epoch}/${m.offset}`), {
      onGap: (info) => gaps.push(info),
    });
    server.roomFrame(server.socket, "text", { room: "lobby", offset: 1, epoch: "e1", from: "x", text: "1" });
    server.roomFrame(server.socket, "text", { room: "lobby", offset: 1, epoch: "e2", from: "x", text: "2" });
    await until(() => a.length === 2);
    assert.deepEqual(a, ["e1/1", "e2/1"]); // offsets restart in the new epoch: not a duplicate
    assert.deepEqual(gaps, [{ room: "lobby", epoch: "e2", reason: "epoch_changed" }]);
    alice.close();
  });
});
