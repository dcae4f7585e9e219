// Token refresh: a `system` `token_expiring` notice is answered with `auth.refresh`.
import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { connect } from "../backchannel.js";
import { FakeServer, tick, until } from "./fake.mjs";

describe("token refresh", () => {
  it("answers token_expiring with auth.refresh carrying the provider's token", async () => {
    const server = new FakeServer();
    server.handlers["auth.refresh"] = () => ({ type: "auth.refresh", content: { principal: "alice" } });
    let n = 0;
    const notices = [];
    const client = await connect("ws://fake.test/ws", {
      WebSocket: server.WebSocket,
      heartbeat: 0,
      tokenProvider: async () => `t${++n}`,
      onMessage: (frame) => notices.push(frame),
    });
    server.push(server.socket, "system", { event: "token_expiring", expiresIn: 5 });
    const [refresh] = await until(() => server.messages("auth.refresh").length && server.messages("auth.refresh"));
    assert.deepEqual(refresh.content, { token: "t2" });
    assert.equal(server.messages("init")[0].content.token, "t1");
    assert.equal(notices[0].content.event, "token_expiring"); // still reported
    await tick(5);
    assert.equal(client.state, "connected");
    client.close();
  });

  it("ignores token_expiring without a tokenProvider", async () => {
    const server = new FakeServer();
    const client = await connect("ws://fake.test/ws", { WebSocket: server.WebSocket, heartbeat: 0, token: "t" });
    server.push(server.socket, "system", { event: "token_expiring", expiresIn: 5 });
    await tick(5);
    assert.deepEqual(server.messages("auth.refresh"), []);
    client.close();
  });
});
