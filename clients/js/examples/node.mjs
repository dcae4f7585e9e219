// backchannel.js on Node (20 or later) with the ws package (`npm install ws`).
//
//   BACKCHANNEL_TOKEN=eyJ… node node.mjs ws://127.0.0.1:8765/ws https://chat.example.com
//
// Connects (the token, when set, goes in `init`; the second argument, when given, is the
// handshake's Origin, for a server with an Origin allow-list), asks one `text` request,
// joins the room `lobby` and publishes to it, then prints what the server pushes, one JSON
// line per event, until its standard input ends.
import WebSocket from "ws";

import { connect } from "../backchannel.js";

const [url = "ws://127.0.0.1:8765/ws", origin] = process.argv.slice(2);
const print = (event, data) => console.log(JSON.stringify({ event, ...data }));

let client;
try {
  client = await connect(url, {
    WebSocket,
    origin,
    token: process.env.BACKCHANNEL_TOKEN,
    onState: (state, info) => print("state", { state, info }),
    onMessage: (frame) => print("push", { frame }),
  });
} catch (error) {
  print("failed", { code: error.code, message: error.message });
  process.exit(1);
}
print("reply", { content: await client.request("text", { text: "hello from Node" }) });
const room = await client.subscribe("lobby", (message) => print("room", { message }));
print("published", { message: await room.publish("hello, lobby") });
process.stdin.on("end", () => client.close());
process.stdin.resume();
