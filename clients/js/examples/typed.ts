// A typed client: `npx tsc` checks this file against backchannel.d.ts and the contracts
// generated from the server's AsyncAPI document (contracts.d.ts). It is compiled, never
// run (`tsc --noEmit`): the lines marked @ts-expect-error must stay errors.
import { BackchannelError, connect, type RequestErrorCode } from "../backchannel.js";

export async function chat(url: string, token: string): Promise<void> {
  const client = await connect(url, { token, onState: (state) => console.log(state) });

  const echo = await client.request("text", { text: "hi" }); // TextReply
  console.log(echo.from, echo.text.toUpperCase());

  const pong = await client.request("ping", { clientTime: Date.now() }); // PingReply
  console.log(pong.serverTime);

  const joined = await client.request("join", { room: "lobby", since: { offset: 0, epoch: "e" } });
  const members: string[] = joined.members ?? []; // (a large room answers a count instead)
  console.log(members, joined.offset + 1);

  const room = await client.subscribe("lobby", (message) => console.log(message.offset, message.text));
  const sent = await room.publish("hello, room");
  console.log(sent.offset);

  const left = await client.request("leave", { room: "lobby" }); // an ack: {}
  console.log(Object.keys(left).length === 0);

  // A type the contract does not list still works, untyped.
  const custom = await client.request("weather", { city: "Paris" });
  console.log(custom["sky"]);

  try {
    await client.request("presence", { room: "support" });
  } catch (error) {
    if (error instanceof BackchannelError && error.code === "forbidden") {
      const expected: RequestErrorCode<"presence"> = error.code;
      console.log(expected, error.retryAfter);
    }
  }

  // @ts-expect-error: join needs a room
  await client.request("join", {});
  // @ts-expect-error: text's text is a string
  await client.request("text", { text: 42 });
  // @ts-expect-error: pong's serverTime is a string
  const when: number = (await client.request("ping")).serverTime;
  console.log(when);
  // @ts-expect-error: "nope" is no error code of join
  const wrong: RequestErrorCode<"join"> = "nope";
  console.log(wrong);

  client.close();
}
