/**
 * A fake WebSocket class and an in-process fake server speaking protocol v1
 * the way docs/protocol.md says the real one does: sessions with `seq` and an
 * outbox, `init` resume, safe retries (answers remembered per session and
 * request id), rooms with offsets, epoch, history and presence. Room messages
 * and presence events are room frames (`room`, `offset`, `epoch`; no `seq`),
 * written to the connections that joined (the sender's too), kept in no outbox;
 * membership belongs to the session, so a resumed session's `init` answer lists
 * its rooms, which deliver nothing until joined again. Tests inject
 * `server.WebSocket` into the client and drive the server directly.
 *
 * This file is a helper: it declares no tests.
 */

/** The connection states of the browser WebSocket API. */
const CONNECTING = 0;
const OPEN = 1;
const CLOSING = 2;
const CLOSED = 3;

/** Wait until every queued macrotask ran (timers of 0 ms included). */
export const tick = (ms = 0) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Poll `predicate` until it is truthy (or fail after `timeout` ms).
 * @param {() => unknown} predicate
 * @param {number} [timeout]
 */
export async function until(predicate, timeout = 2000) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = predicate();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`condition not met within ${timeout} ms: ${predicate}`);
    await tick(1);
  }
}

export class FakeServer {
  constructor({ resume = true, epoch = "e1", notResumed = "unknown_session" } = {}) {
    /** Answer `init` with `resumed: true` when the session is known. */
    this.resume = resume;
    /** The reason of a `resumed: false` answer (e.g. "trimmed", "evicted"). */
    this.notResumed = notResumed;
    /** Every socket ever opened, in order. */
    this.sockets = [];
    /** Every request received, in order: {socket, message}. */
    this.received = [];
    /** How often each request id was handled (dedupe makes retries not count). */
    this.executions = new Map();
    /** Fail this many upcoming connection attempts (close 1006 before open). */
    this.refuse = 0;
    /** Do not answer these types at all (not even a retry). */
    this.silent = new Set();
    /** Answer init with this error code when it asks to resume ("forbidden": not yours). */
    this.refuseResume = null;
    /** Answer every init with this error code (e.g. "unauthorized"). */
    this.refuseInit = null;
    /** Answer the next `count` inits with error `code` ("not now": overloaded, ...). */
    this.busy = { count: 0, code: "overloaded", retryAfter: undefined };
    /** Replay this many frames more than asked for on resume (a sloppy server). */
    this.replayOverlap = 0;
    /** Handlers per type: (content, session) => {type, content} | {error} | undefined. */
    this.handlers = {
      text: (c, s) =>
        c.room ? this._publish(c, s) : { type: "text", content: { text: c.text, from: s.principal } },
      ping: (c) => ({ type: "pong", content: { serverTime: "now", clientTime: c.clientTime } }),
      join: (c, s, m, socket) => this._join(c, s, socket),
      leave: (c, s) => {
        this.rooms.get(c.room)?.members.delete(s);
        this.rooms.get(c.room)?.live.delete(s);
        return undefined;
      },
      presence: (c) => ({ type: "presence", content: { room: c.room, members: this._members(c.room) } }),
    };
    this.sessions = new Map();
    /** room -> {epoch, offset, history: content[], members: Set<session>,
     *  live: Map<session, socket that joined>} */
    this.rooms = new Map();
    this.epoch = epoch;
    this._n = 0;
    const server = this;

    /** The fake, injected into the client as `options.WebSocket`. */
    this.WebSocket = class FakeSocket {
      constructor(url, protocols) {
        this.url = url;
        this.protocols = protocols;
        this.readyState = CONNECTING;
        this.session = null;
        this.closeCode = null;
        this.onopen = this.onmessage = this.onclose = this.onerror = null;
        server.sockets.push(this);
        setTimeout(() => server._accept(this), 0);
      }

      send(data) {
        if (this.readyState !== OPEN) throw new Error("InvalidStateError: not open");
        server._receive(this, JSON.parse(data));
      }

      close(code = 1000, reason = "") {
        if (this.readyState >= CLOSING) return;
        this.readyState = CLOSING;
        this.closeCode = code;
        setTimeout(() => server._closed(this, code, reason), 0);
      }
    };
  }

  /** The socket the client uses now. */
  get socket() {
    return this.sockets[this.sockets.length - 1];
  }

  /** Requests received, optionally of one type. */
  messages(type) {
    return this.received.map((r) => r.message).filter((m) => !type || m.type === type);
  }

  /** Close every open socket from the server side (as `c.close(1011)` does). */
  dropAll(code = 1011, reason = "") {
    for (const socket of this.sockets) {
      if (socket.readyState === OPEN || socket.readyState === CONNECTING) this._closed(socket, code, reason);
    }
  }

  /** Send a frame that answers nothing (a notice) to a socket's session. */
  push(socket, type, content) {
    this._send(socket.session, { type, content });
  }

  /** Write a room frame (not numbered, not kept) to a socket. */
  roomFrame(socket, type, content) {
    const frame = { id: `r-${(this._frames = (this._frames ?? 0) + 1)}`, type, content, room: content.room };
    if (Number.isInteger(content.offset)) Object.assign(frame, { offset: content.offset, epoch: content.epoch });
    frame.timestamp = "2026-11-25T10:00:00.000Z";
    if (socket && socket.readyState === OPEN) {
      const data = JSON.stringify(frame);
      setTimeout(() => socket.readyState === OPEN && socket.onmessage?.({ data }), 0);
    }
  }

  /** Forget every session's outbox (as a restarted server without a shared broker). */
  forgetSessions() {
    this.sessions.clear();
  }

  // ------------------------------------------------------------------ internals

  _accept(socket) {
    if (socket.readyState !== CONNECTING) return;
    if (this.refuse > 0) {
      this.refuse -= 1;
      this._closed(socket, 1006, "refused");
      return;
    }
    socket.readyState = OPEN;
    socket.session = this._newSession();
    socket.session.socket = socket;
    socket.onopen?.({});
  }

  _closed(socket, code, reason) {
    if (socket.readyState === CLOSED) return;
    socket.readyState = CLOSED;
    if (socket.session && socket.session.socket === socket) socket.session.socket = null;
    for (const room of this.rooms.values()) {
      if (room.live.get(socket.session) === socket) room.live.delete(socket.session);
    }
    socket.onclose?.({ code, reason });
  }

  _newSession() {
    this._n += 1;
    const session = {
      id: `s-${this._n}`,
      principal: `anonymous:${this._n}`,
      seq: 0,
      outbox: [],
      answers: new Map(),
      inflight: new Set(),
      socket: null,
    };
    this.sessions.set(session.id, session);
    return session;
  }

  /** Number a frame, keep it in the outbox, write it when the session has a socket. */
  _send(session, { type, content, replyTo }) {
    session.seq += 1;
    const frame = { id: `f-${session.id}-${session.seq}`, type, content: content ?? {}, seq: session.seq };
    if (replyTo !== undefined) frame.replyTo = replyTo;
    frame.timestamp = "2026-11-25T10:00:00.000Z";
    session.outbox.push(frame);
    const socket = session.socket;
    if (socket && socket.readyState === OPEN) {
      const data = JSON.stringify(frame);
      setTimeout(() => socket.readyState === OPEN && socket.onmessage?.({ data }), 0);
    }
    return frame;
  }

  _receive(socket, message) {
    this.received.push({ socket, message });
    let session = socket.session;
    if (message.type === "init") {
      const c = message.content || {};
      if (this.busy.count > 0) {
        this.busy.count -= 1;
        const { code, retryAfter } = this.busy;
        const content = { code, message: "not now", ...(retryAfter === undefined ? {} : { retryAfter }) };
        this._send(session, { type: "error", replyTo: message.id, content });
        return;
      }
      const refusal = this.refuseInit || (c.sessionId ? this.refuseResume : null);
      if (refusal) {
        const content = { code: refusal, message: `init refused: ${refusal}` };
        this._send(session, { type: "error", replyTo: message.id, content });
        return;
      }
      // a session of another broker epoch (the broker lost its state) cannot be resumed
      const sameEpoch = c.epoch === undefined || c.epoch === this.epoch;
      const old = c.sessionId && sameEpoch ? this.sessions.get(c.sessionId) : undefined;
      if (this.resume && old && old !== session && c.lastSeq <= old.seq) {
        if (old.socket && old.socket !== socket) this._closed(old.socket, 4009, "session taken over");
        this.sessions.delete(session.id);
        for (const room of this.rooms.values()) room.members.delete(session);
        old.socket = socket;
        socket.session = session = old;
        const missed = old.outbox.filter((f) => f.seq > c.lastSeq);
        const replay = old.outbox.filter((f) => f.seq > c.lastSeq - this.replayOverlap);
        for (const frame of replay) {
          const data = JSON.stringify(frame);
          setTimeout(() => socket.readyState === OPEN && socket.onmessage?.({ data }), 0);
        }
        const rooms = [...this.rooms].filter(([, r]) => r.members.has(session)).map(([name]) => name);
        this._send(session, {
          type: "init",
          replyTo: message.id,
          content: { sessionId: session.id, resumed: true, missed: missed.length, epoch: this.epoch, server: {}, rooms },
        });
        return;
      }
      const content = { sessionId: session.id, resumed: false, missed: 0, epoch: this.epoch, server: {} };
      if (c.sessionId) content.reason = sameEpoch ? this.notResumed : "epoch_changed";
      this._send(session, { type: "init", replyTo: message.id, content });
      return;
    }
    if (message.type === "cancel") {
      this._send(session, {
        type: "ack",
        replyTo: message.id,
        content: { target: message.content.target, cancelled: false },
      });
      return;
    }
    const remembered = session.answers.get(message.id);
    if (remembered) {
      // Safe retry: the original answer again, the handler does not run twice.
      this._send(session, { ...remembered, replyTo: message.id });
      return;
    }
    if (session.inflight.has(message.id)) return; // a retry joins the running request
    this.executions.set(message.id, (this.executions.get(message.id) || 0) + 1);
    if (this.silent.has(message.type)) return;
    const handler = this.handlers[message.type];
    let answer;
    if (!handler) {
      answer = { type: "error", content: { code: "unknown_type", message: `unknown type ${message.type}` } };
    } else {
      const result = handler(message.content || {}, session, message, socket);
      if (result === "hold") {
        session.inflight.add(message.id);
        return;
      }
      if (result && result.chunks) {
        for (const chunk of result.chunks)
          this._send(session, { type: "chunk", replyTo: message.id, content: chunk });
        answer = { type: "ack", content: {} };
      } else {
        answer = result || { type: "ack", content: {} };
      }
    }
    session.answers.set(message.id, answer);
    this._send(session, { ...answer, replyTo: message.id });
  }

  /** Answer a held request later (as a handler that finishes after a disconnect). */
  answer(sessionId, requestId, answer) {
    const session = this.sessions.get(sessionId);
    session.inflight.delete(requestId);
    session.answers.set(requestId, answer);
    this._send(session, { ...answer, replyTo: requestId });
  }

  _room(name) {
    let room = this.rooms.get(name);
    if (!room) {
      room = { epoch: this.epoch, offset: 0, history: [], members: new Set(), live: new Map() };
      this.rooms.set(name, room);
    }
    return room;
  }

  _members(name) {
    return [...this._room(name).members].map((s) => s.principal);
  }

  _join(c, session, socket) {
    const room = this._room(c.room);
    const content = { room: c.room, count: 0, members: [], offset: room.offset, epoch: room.epoch };
    if (c.since) {
      const first = room.history[0];
      const covered = c.since.epoch === room.epoch && (!first ? true : first.offset <= c.since.offset + 1);
      content.recovered = covered;
      if (covered) {
        const missed = room.history.filter((m) => m.offset > c.since.offset);
        for (const m of missed) this.roomFrame(socket, "text", m);
        content.missed = missed.length;
      }
    }
    if (!room.live.has(session)) {
      const event = { room: c.room, event: "join", member: session.principal };
      for (const other of room.live.values()) this.roomFrame(other, "presence", event);
    }
    room.members.add(session);
    room.live.set(session, socket);
    content.members = this._members(c.room);
    content.count = content.members.length;
    return { type: "join", content };
  }

  _publish(c, session) {
    const room = this._room(c.room);
    if (!room.members.has(session)) {
      return { type: "error", content: { code: "forbidden", message: "content.room: not a member" } };
    }
    room.offset += 1;
    const message = {
      room: c.room,
      offset: room.offset,
      epoch: room.epoch,
      from: session.principal,
      text: c.text,
    };
    room.history.push(message);
    for (const socket of room.live.values()) this.roomFrame(socket, "text", message);
    return { type: "text", content: message };
  }
}
