/**
 * backchannel.js: the browser client for the backchannel wire protocol v1.
 *
 * One dependency-free ES module (no build step). The server ships it at
 * `/static/backchannel.js`. On Node (20 or later) pass the `ws` package's class
 * (`npm install ws`), which can also send an `Origin` and other headers:
 *
 * ```js
 * import WebSocket from "ws";
 * const client = await connect(url, { WebSocket, token, origin: "https://chat.example.com" });
 * ```
 *
 * ```js
 * import { connect } from "/static/backchannel.js";
 * const client = await connect(`ws://${location.host}/ws`, { onState: console.log });
 * const reply = await client.request("text", { text: "hi" });       // {text, from}
 * const room = await client.subscribe("lobby", (msg) => show(msg));  // room messages
 * await room.publish("hello, room");
 * ```
 *
 * What it promises, as the Python client does (docs/protocol.md):
 * - every request settles once: with the terminal answer's content (`{}` for an
 *   `ack`), or with a {@link BackchannelError} carrying the server's `code`;
 * - a lost connection is re-opened with exponential backoff and full jitter;
 *   the new connection sends `init {sessionId, lastSeq, epoch, token}` first (the
 *   token never goes in the URL), drops replayed frames it already saw
 *   (`seq <= lastSeq`), re-sends every request that has no answer yet with the
 *   same id (the server answers a retry from its dedupe cache instead of
 *   running the handler twice), and re-joins its rooms with `since` (a room
 *   delivers nothing to a resumed session until it is joined again; messages
 *   replayed twice are dropped by offset);
 * - two streams reach it: the session's frames (answers, pushes; numbered by
 *   `seq`) and the rooms' frames (`room`, `offset`, `epoch`; no `seq`), each in
 *   order, with no order between them: a subscription takes its messages from
 *   room frames only (a publish's reply just settles the request) and holds
 *   them while its join is unanswered;
 * - an `init` answered `overloaded`, `shutting_down` or `rate_limited` means "not
 *   now": the client drops that connection and reconnects with backoff (waiting
 *   at least `retryAfter`), before the first connection too, keeping its session;
 * - liveness: browsers cannot send protocol pings, so the client sends the
 *   application `ping` type every `heartbeat` ms and reconnects when nothing
 *   (no `pong`, no other frame) arrived within the next interval.
 *
 * States reported through `onState(state, info)`: `connecting`, `connected`
 * ({sessionId}), `reconnecting` ({attempt, delay, code, reason}), `resumed`
 * ({sessionId, missed}), `resynced` ({sessionId, previous, reason, resent}: the
 * session could not be resumed, so frames after `lastSeq` may be missing, and the
 * re-sent requests run in the new session, where one that had already run before
 * the drop may run again; rooms are re-joined with `since` and report themselves
 * whether their history covered the gap), `closed` ({code, reason}).
 *
 * Same semantics as the Python client (`backchannel.client`), with what a browser
 * changes: the token travels only in `init` (no headers on a browser WebSocket;
 * `origin` and `headers` need a WebSocket class that takes them, such as `ws`),
 * liveness is the `ping` type instead of protocol pings, and room messages come
 * through a callback instead of an async iterator.
 *
 * @module backchannel
 */

/** The WebSocket subprotocol of wire protocol v1. */
export const PROTOCOL = "backchannel.v1";
/** This client's version (sent in `init.client`). */
export const VERSION = "0.1.0";

/**
 * Close codes after which reconnecting would only repeat the refusal (policy,
 * unauthorized, forbidden) or fight another client for the session (4009, taken
 * over): the Python client's set. 4008 (token expired) is fatal only without a
 * `tokenProvider`, which could bring a fresh token.
 */
const NO_RETRY = new Set([1008, 4001, 4003, 4009]);
/**
 * Error codes of an `init` answer that mean "not now" (the server is overloaded, e.g.
 * its broker is away; shutting down; rate limiting): reconnect with backoff, keeping
 * the session to resume, even before the first connection succeeded.
 */
const RETRY_INIT = new Set(["overloaded", "shutting_down", "rate_limited"]);
const OPEN = 1; // WebSocket.OPEN, without depending on the global

/**
 * A request that failed: an `error` frame from the server, or a client-side
 * failure. Server codes are the closed set of docs/protocol.md (`validation_failed`,
 * `rate_limited`, ...). Client-side codes (`clientSide` is true): `timeout` (no
 * answer within the request's timeout: the request is forgotten, not cancelled),
 * `connect_failed` (the first connection failed: no retrying forever on a wrong URL),
 * `closed` (the client was closed, the server refused it for good, or it gave up),
 * `too_large` (over `maxMessageSize`, never sent), `interrupted` (a stream that
 * had produced chunks lost its session, so its items cannot continue).
 */
export class BackchannelError extends Error {
  /**
   * @param {string} code error code
   * @param {string} message human-readable text
   * @param {{details?: object[], retryAfter?: number, ref?: string, replyTo?: string|null,
   *          clientSide?: boolean}} [extra]
   */
  constructor(code, message, extra = {}) {
    super(message);
    this.name = "BackchannelError";
    /** @type {string} */
    this.code = code;
    /** @type {object[]|undefined} JSON paths and broken rules (`validation_failed`) */
    this.details = extra.details;
    /** @type {number|undefined} seconds to wait before retrying (`rate_limited`, `overloaded`) */
    this.retryAfter = extra.retryAfter;
    /** @type {string|undefined} matches the server's log line (`handler_error`) */
    this.ref = extra.ref;
    /** @type {string|null|undefined} the request id this error answers */
    this.replyTo = extra.replyTo;
    /** @type {boolean} true when the client, not the server, raised it */
    this.clientSide = Boolean(extra.clientSide);
  }

  /**
   * The error an `error` frame carries.
   * @param {object} frame a server frame of type `error`
   * @returns {BackchannelError}
   */
  static fromFrame(frame) {
    const c = frame.content || {};
    return new BackchannelError(c.code || "handler_error", c.message || "error", {
      details: c.details,
      retryAfter: c.retryAfter,
      ref: c.ref,
      replyTo: frame.replyTo,
    });
  }
}

/**
 * @typedef {object} Backoff
 * @property {number} [initial=100] ms: the cap of the first retry delay
 * @property {number} [maximum=10000] ms: the largest cap
 * @property {number} [factor=2] growth of the cap per failed attempt
 * @property {number} [maxAttempts] give up (state `closed`) after this many reconnect
 *   attempts in a row; default: never
 */

/**
 * @typedef {object} ConnectOptions
 * @property {string} [token] credential, sent in `init` (never in the URL)
 * @property {() => (string|Promise<string>)} [tokenProvider] called before every
 *   connection's `init` and on a `system` `token_expiring` notice (answered with
 *   `auth.refresh`); wins over `token`, and makes 4008 (token expired) recoverable
 * @property {boolean} [reconnect=true] re-open lost connections
 * @property {Backoff} [backoff] retry delays: attempt n waits random() * min(maximum, initial * factor^(n-1))
 * @property {number} [heartbeat=15000] ms between app-level pings; 0 disables
 * @property {number} [timeout=30000] default request timeout in ms (reconnects included)
 * @property {number} [connectTimeout=10000] ms for a connection to open and answer `init`
 * @property {number} [maxMessageSize=65536] largest request in bytes (the server's default);
 *   bigger ones are rejected with `too_large` instead of getting the connection closed (1009)
 * @property {(state: string, info: object) => void} [onState] connection state changes
 * @property {(frame: object) => void} [onMessage] server frames that answer no request of
 *   this client and belong to no subscribed room (e.g. `system` notices)
 * @property {Function} [WebSocket] the WebSocket class (default: `globalThis.WebSocket`);
 *   on Node 20, which has none, the `ws` package's (`import WebSocket from "ws"`)
 * @property {string} [origin] the handshake's `Origin` header, for a non-browser client
 *   of a server with an Origin allow-list (`server.origins`); needs a WebSocket class
 *   that takes options, such as `ws` (a browser always sends its page's origin)
 * @property {Object<string, string>} [headers] more handshake headers (same condition)
 * @property {() => number} [random=Math.random] jitter source in [0, 1) (tests pin it)
 */

/**
 * Open a client and wait until its first connection answered `init`.
 *
 * The first connection must succeed: a wrong URL or a refused token rejects with
 * `connect_failed` at once instead of retrying forever (as the Python client).
 * Once connected, lost connections are re-opened (`reconnect`).
 *
 * @param {string} url e.g. `ws://127.0.0.1:8765/ws`
 * @param {ConnectOptions} [options]
 * @returns {Promise<Client>}
 */
export async function connect(url, options = {}) {
  const client = new Client(url, options);
  await client.ready;
  return client;
}

/**
 * One logical client: a session that outlives its WebSocket connections.
 * Create it with {@link connect}.
 */
export class Client {
  /**
   * @param {string} url
   * @param {ConnectOptions} [options]
   */
  constructor(url, options = {}) {
    const backoff = options.backoff || {};
    this.url = url;
    this._options = {
      token: options.token,
      tokenProvider: options.tokenProvider,
      reconnect: options.reconnect !== false,
      initial: backoff.initial ?? 100,
      maximum: backoff.maximum ?? 10000,
      factor: backoff.factor ?? 2,
      maxAttempts: backoff.maxAttempts ?? Infinity,
      heartbeat: options.heartbeat ?? 15000,
      timeout: options.timeout ?? 30000,
      connectTimeout: options.connectTimeout ?? 10000,
      maxMessageSize: options.maxMessageSize ?? 65536,
      onState: options.onState,
      onMessage: options.onMessage,
      random: options.random || Math.random,
    };
    this._WebSocket = options.WebSocket || globalThis.WebSocket;
    if (typeof this._WebSocket !== "function") {
      throw new TypeError(
        "no WebSocket class: this runtime has no global WebSocket (Node 20). " +
          'Install the ws package (npm install ws) and pass it: import WebSocket from "ws"; ' +
          "connect(url, { WebSocket })",
      );
    }
    /** The third argument of the WebSocket constructor (`ws` options), if any. */
    this._socketOptions = null;
    if (options.origin !== undefined || options.headers !== undefined) {
      if (!options.WebSocket || options.WebSocket === globalThis.WebSocket) {
        throw new TypeError(
          "origin and headers need a WebSocket class that sends them, e.g. the ws package: " +
            'import WebSocket from "ws"; connect(url, { WebSocket, origin })',
        );
      }
      this._socketOptions = { headers: { ...options.headers } };
      if (options.origin !== undefined) this._socketOptions.origin = options.origin;
    }
    /** @type {string} the last state reported through onState */
    this.state = "connecting";
    /** @type {string|null} the session this client is in (null before the first init) */
    this.sessionId = null;
    /** @type {number} highest `seq` seen in the current session */
    this.lastSeq = 0;
    /** @type {string|null} the broker epoch of the session (`init`'s answer), sent back on resume */
    this.epoch = null;
    /** @type {string|null} who the server says we are (`init`'s `principal`) */
    this.principal = null;
    /** @type {number|null} round-trip time in ms of the last app-level ping */
    this.latency = null;
    /** @type {Map<string, object>} user requests without a terminal answer, in send order */
    this._pending = new Map();
    /** @type {Map<string, Subscription>} */
    this._rooms = new Map();
    this._conn = null;
    this._attempt = 0;
    this._everConnected = false;
    this._closed = false;
    this._retryTimer = null;
    this._counter = 0;
    this._idPrefix = Math.floor(this._options.random() * 36 ** 4).toString(36) + "-";
    this._encoder = new TextEncoder();
    /** Resolves when the first connection answered `init`; rejects when it failed. */
    this.ready = new Promise((resolve, reject) => {
      this._readyResolve = resolve;
      this._readyReject = reject;
    });
    this.ready.catch(() => {}); // connect() reports it; don't warn about an unhandled rejection
    this._setState("connecting", { attempt: 1 });
    this._open();
  }

  // ------------------------------------------------------------------ requests

  /**
   * Send a request; resolve with its terminal answer's content.
   *
   * The request survives reconnects: it is sent when the client is connected and
   * re-sent with the same id after a reconnect until it is answered.
   *
   * @param {string} type message type, e.g. `text`
   * @param {object} [content]
   * @param {{timeout?: number}} [options] ms before rejecting with `timeout`
   * @returns {Promise<object>} the answer's content (`{}` for `ack`)
   */
  request(type, content = {}, options = {}) {
    return new Promise((resolve, reject) => {
      this._add(type, content, options.timeout, { resolve, reject });
    });
  }

  /**
   * Send a request whose handler streams: iterate its `chunk` contents; the
   * iteration ends at the terminal `ack` (a plain reply is yielded as the last
   * item) and throws on an `error`. Leaving the loop early (`break`) sends a
   * `cancel` for the request.
   *
   * @param {string} type
   * @param {object} [content]
   * @param {{timeout?: number}} [options] ms allowed between two chunks
   * @returns {AsyncIterableIterator<object>}
   */
  stream(type, content = {}, options = {}) {
    const chunks = [];
    let finished = false;
    let failure = null;
    let wake = null;
    const notify = () => {
      if (wake) {
        const w = wake;
        wake = null;
        w();
      }
    };
    const record = this._add(type, content, options.timeout, {
      resolve: (answer, frame) => {
        if (frame && frame.type !== "ack") chunks.push(answer);
        finished = true;
        notify();
      },
      reject: (error) => {
        finished = true;
        failure = error;
        notify();
      },
      onChunk: (chunk) => {
        chunks.push(chunk);
        notify();
      },
    });
    const client = this;
    return {
      /** The request id. */
      id: record.id,
      [Symbol.asyncIterator]() {
        return this;
      },
      async next() {
        for (;;) {
          if (chunks.length) return { value: chunks.shift(), done: false };
          if (failure) {
            const error = failure;
            failure = null;
            throw error;
          }
          if (finished) return { value: undefined, done: true };
          await new Promise((resolve) => {
            wake = resolve;
          });
        }
      },
      async return() {
        if (!finished) client._abandon(record, true, null);
        finished = true;
        chunks.length = 0;
        return { value: undefined, done: true };
      },
    };
  }

  /**
   * Join a room and receive its messages, in offset order, each once.
   *
   * After a reconnect the room is re-joined with `since: {offset, epoch}` of the
   * last message seen, so the server replays what was missed; when its history
   * cannot cover the gap (`recovered: false`: reason `not_recovered`), or the room's
   * epoch changed under a live subscription (`epoch_changed`), `onGap` is called.
   *
   * @param {string} room
   * @param {(message: object, frame: object) => void} onMessage called with each room
   *   message's content `{room, offset, epoch, from, text, ...}` (own messages included)
   * @param {{onPresence?: (members: string[], event: object|null) => void,
   *          onGap?: (info: {room: string, missed?: number, epoch?: string, reason: string}) => void,
   *          onError?: (error: BackchannelError) => void, timeout?: number}} [options]
   * @returns {Promise<Subscription>} once joined
   */
  async subscribe(room, onMessage, options = {}) {
    if (this._rooms.has(room)) throw new Error(`already subscribed to ${room}`);
    const sub = new Subscription(this, room, onMessage, options);
    this._rooms.set(room, sub); // before the answer: replayed messages may precede it
    try {
      sub._joined(await this.request("join", { room }, { timeout: options.timeout }));
    } catch (error) {
      this._rooms.delete(room);
      throw error;
    }
    return sub;
  }

  /**
   * Who is in a room (principal ids).
   * @param {string} room
   * @param {{timeout?: number}} [options]
   * @returns {Promise<string[]>}
   */
  async presence(room, options = {}) {
    const content = await this.request("presence", { room }, options);
    const members = content.members || [];
    this._rooms.get(room)?._setMembers(members, null);
    return members;
  }

  /**
   * Close the client for good: pending requests reject with `closed`.
   * @param {number} [code=1000]
   * @param {string} [reason]
   */
  close(code = 1000, reason = "client closed") {
    if (this._closed) return;
    const conn = this._conn;
    if (conn) {
      this._detach(conn);
      try {
        conn.ws.close(code, reason);
      } catch {
        // already closing
      }
    }
    this._shutdown(
      code,
      reason,
      new BackchannelError("closed", "the client was closed", { clientSide: true }),
    );
  }

  // ------------------------------------------------------------- connections

  /** Open one WebSocket connection attempt. */
  _open() {
    this._retryTimer = null;
    if (this._closed) return;
    let ws;
    try {
      ws = this._socketOptions
        ? new this._WebSocket(this.url, PROTOCOL, this._socketOptions)
        : new this._WebSocket(this.url, PROTOCOL);
    } catch (error) {
      // A malformed URL: no retry can fix it.
      const failed = new BackchannelError("connect_failed", String(error), { clientSide: true });
      this._shutdown(1006, String(error), failed);
      return;
    }
    const conn = {
      ws,
      ready: false,
      token: undefined,
      fresh: false, // set when the server refused to resume: init again, without the session
      refused: null,
      busy: null, // init answered "not now" (RETRY_INIT): ms to wait at least before the next
      buffer: [],
      initId: null,
      internal: new Map(),
      heartbeat: null,
      pingAt: 0,
      lastFrameAt: 0,
      openTimer: null,
      failure: "", // what the socket's error event said (ws: "Unexpected server response: 403")
    };
    this._conn = conn;
    conn.openTimer = setTimeout(
      () => this._drop(conn, 4000, "connect timeout"),
      this._options.connectTimeout,
    );
    ws.onopen = () => this._onOpen(conn);
    ws.onmessage = (event) => this._onData(conn, event.data);
    ws.onclose = (event) => this._lost(conn, event.code, event.reason || "");
    ws.onerror = (event) => {
      // a close event follows; browsers say nothing more, ws says why
      conn.failure = event?.message || event?.error?.message || "";
    };
  }

  /** The socket is open: say `init` first (nothing else goes out before its answer). */
  async _onOpen(conn) {
    let token = this._options.token;
    if (this._options.tokenProvider) {
      try {
        token = await this._options.tokenProvider();
      } catch (error) {
        this._drop(conn, 4000, `tokenProvider failed: ${error}`);
        return;
      }
    }
    if (conn !== this._conn) return;
    conn.token = token;
    this._sendInit(conn);
  }

  /** Say `init`: resume our session (unless the server refused that), carry the token. */
  _sendInit(conn) {
    const content = { client: { name: "backchannel.js", version: VERSION } };
    if (this.sessionId && !conn.fresh) {
      content.sessionId = this.sessionId;
      content.lastSeq = this.lastSeq;
      // a server whose broker lost this epoch answers resumed: false, reason epoch_changed
      if (this.epoch !== null) content.epoch = this.epoch;
    }
    if (conn.token) content.token = conn.token;
    conn.initId = this._nextId();
    this._write(conn, { id: conn.initId, type: "init", content });
  }

  /** A text frame arrived on `conn`. */
  _onData(conn, data) {
    if (conn !== this._conn) return;
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return; // not protocol v1; the server never sends this
    }
    if (!frame || typeof frame !== "object") return;
    conn.lastFrameAt = Date.now();
    if (conn.ready) {
      this._deliver(conn, frame);
    } else if (conn.initId !== null && frame.replyTo === conn.initId) {
      this._onInit(conn, frame);
    } else {
      // Until init is answered we cannot know whether these frames are the replay of
      // our session (dedupe against lastSeq) or the first frames of a new one.
      conn.buffer.push(frame);
    }
  }

  /** The answer to `init`: the connection is ready; replay, re-join, re-send. */
  _onInit(conn, frame) {
    if (frame.type === "error") {
      const error = BackchannelError.fromFrame(frame);
      if (RETRY_INIT.has(error.code)) {
        // Not now: keep the session for later, reconnect with backoff.
        const wait = error.retryAfter;
        conn.busy = typeof wait === "number" && wait > 0 ? wait * 1000 : 0;
        this._drop(conn, 1000, `init answered ${error.code}: ${error.message}`);
        return;
      }
      if (this.sessionId !== null && !conn.fresh) {
        // Resuming was refused (e.g. forbidden: not our session): start anew.
        conn.fresh = true;
        conn.refused = error.code;
        this._sendInit(conn);
        return;
      }
      this._drop(conn, 1000, `init refused: ${error.code}: ${error.message}`, error, true);
      return;
    }
    const c = frame.content || {};
    const previous = this.sessionId;
    const resumed = previous !== null && !conn.fresh && c.resumed === true;
    this.sessionId = c.sessionId ?? null;
    this.epoch = c.epoch ?? null;
    this.principal = c.principal ?? this.principal;
    if (!resumed) this.lastSeq = 0; // a new session numbers its frames from 1 again
    clearTimeout(conn.openTimer);
    conn.ready = true;
    const buffered = conn.buffer;
    conn.buffer = [];
    for (const f of buffered) this._deliver(conn, f);
    if (typeof frame.seq === "number" && frame.seq > this.lastSeq) this.lastSeq = frame.seq;
    this._attempt = 0;
    this._startHeartbeat(conn);

    const first = !this._everConnected;
    this._everConnected = true;
    if (!first) {
      for (const sub of this._rooms.values()) if (sub.joined) sub._rejoin(conn);
    }
    let resent = 0;
    for (const record of this._pending.values()) {
      if (record.onChunk && record.chunks > 0 && !resumed && !first) {
        // Its chunks so far came from a session that is gone: a re-run would repeat them.
        const why = "the stream's session could not be resumed";
        this._settle(record, new BackchannelError("interrupted", why, { clientSide: true }));
        continue;
      }
      this._write(conn, { id: record.id, type: record.type, content: record.content });
      resent += 1;
    }
    if (first) {
      this._setState("connected", { sessionId: this.sessionId });
      this._readyResolve(this);
    } else if (resumed) {
      this._setState("resumed", { sessionId: this.sessionId, missed: c.missed ?? 0 });
    } else {
      const reason = conn.refused ?? c.reason ?? "unknown_session";
      this._setState("resynced", { sessionId: this.sessionId, previous, reason, resent });
    }
  }

  /** Route one server frame of a ready connection. */
  _deliver(conn, frame) {
    const seq = frame.seq;
    if (typeof seq === "number") {
      if (seq <= this.lastSeq) return; // already seen: a replay after resume
      this.lastSeq = seq;
    }
    const content = frame.content && typeof frame.content === "object" ? frame.content : {};
    const replyTo = frame.replyTo;
    let claimed = false;
    if (typeof replyTo === "string") {
      const internal = conn.internal.get(replyTo);
      if (internal) {
        if (frame.type !== "chunk") conn.internal.delete(replyTo);
        internal(frame);
        claimed = true;
      }
      const record = this._pending.get(replyTo);
      if (record) {
        if (frame.type === "chunk") {
          record.chunks += 1;
          this._arm(record); // the timeout bounds the gap between chunks
          if (record.onChunk) record.onChunk(content);
        } else {
          const error = frame.type === "error" ? BackchannelError.fromFrame(frame) : null;
          this._settle(record, error, content, frame);
        }
        claimed = true;
      }
    }
    // A room frame (`room`, no `seq`): a message (live, or a join's replay) or a
    // presence event of a subscribed room.
    const sub =
      typeof frame.room === "string" && replyTo == null ? this._rooms.get(frame.room) : undefined;
    if (sub) {
      if (frame.type === "presence" && typeof content.event === "string") {
        sub._presenceEvent(content);
        return;
      }
      if (Number.isInteger(frame.offset)) {
        sub._message(content, frame);
        return;
      }
    }
    if (frame.type === "system" && content.event === "token_expiring") this._refreshToken(conn);
    if (!claimed && replyTo == null) this._call(this._options.onMessage, frame);
  }

  /**
   * The server warned that the token expires (jwt plugin): send `auth.refresh` with a
   * token from `tokenProvider`. On failure the server closes 4008 and the reconnect
   * asks `tokenProvider` again.
   */
  async _refreshToken(conn) {
    if (!this._options.tokenProvider) return;
    let token;
    try {
      token = await this._options.tokenProvider();
    } catch (error) {
      console.warn("backchannel: tokenProvider failed; cannot refresh the token", error);
      return;
    }
    if (conn !== this._conn || !conn.ready) return;
    const id = this._nextId();
    conn.internal.set(id, (frame) => {
      if (frame.type === "error") console.warn("backchannel: auth.refresh refused", frame.content);
      else conn.token = token;
    });
    this._write(conn, { id, type: "auth.refresh", content: { token } });
  }

  /**
   * `conn` closed (or was abandoned): reconnect with backoff, or stop for good.
   * @param {object} conn
   * @param {number} code close code
   * @param {string} reason
   * @param {BackchannelError|null} [error] what pending requests reject with, if it ends here
   * @param {boolean} [fatal] never reconnect (init refused)
   */
  _lost(conn, code, reason, error = null, fatal = false) {
    if (conn !== this._conn) return;
    this._detach(conn);
    this._conn = null;
    if (this._closed) return;
    const why = `${code}${reason ? ": " + reason : ""}`;
    const busy = conn.busy; // null unless init was answered "not now"
    if (!this._everConnected && busy === null) {
      let message = `cannot connect to ${this.url} (${why})`;
      if (conn.failure) message += `: ${conn.failure}`;
      if (/\b403\b/.test(conn.failure)) {
        const sent = this._socketOptions?.origin;
        message +=
          `. The server's Origin allow-list (server.origins) does not list this client's Origin ` +
          `(${sent ? JSON.stringify(sent) : "none sent"}): pass origin, one of the listed origins`;
      }
      const failed = new BackchannelError("connect_failed", message, { clientSide: true });
      this._shutdown(code, reason, error || failed);
      return;
    }
    const tokenExpired = code === 4008 && !this._options.tokenProvider;
    const givenUp = this._attempt >= this._options.maxAttempts;
    const refused = busy === null && (NO_RETRY.has(code) || tokenExpired);
    if (fatal || givenUp || !this._options.reconnect || refused) {
      let message = givenUp
        ? `gave up after ${this._attempt} reconnect attempts (${why})`
        : `connection closed (${why})`;
      let kind = "closed";
      if (!this._everConnected) {
        kind = "connect_failed"; // only "not now" answers came: connect() rejects
        message = `cannot connect to ${this.url}: ${message}`;
      }
      this._shutdown(code, reason, error || new BackchannelError(kind, message, { clientSide: true }));
      return;
    }
    this._attempt += 1;
    const delay = Math.max(this.backoffDelay(this._attempt), busy ?? 0);
    this._setState("reconnecting", { attempt: this._attempt, delay, code, reason });
    this._retryTimer = setTimeout(() => this._open(), delay);
  }

  /**
   * The delay before reconnect attempt `attempt` (1-based): full jitter,
   * `random() * min(maximum, initial * factor^(attempt-1))`.
   * @param {number} attempt
   * @returns {number} ms
   */
  backoffDelay(attempt) {
    const o = this._options;
    const cap = Math.min(o.maximum, o.initial * o.factor ** (attempt - 1));
    return Math.floor(o.random() * cap);
  }

  /** Give up on `conn` now (dead, timed out, refused): close it without waiting, then reconnect. */
  _drop(conn, code, reason, error = null, fatal = false) {
    if (conn !== this._conn) return;
    try {
      // a browser may only close with 1000 or 3000-4999; the reason is at most 123 bytes
      conn.ws.close(code === 1000 || code >= 3000 ? code : 4000, reason.slice(0, 60));
    } catch {
      // not open yet, or already closing
    }
    this._lost(conn, code, reason, error, fatal);
  }

  /** Stop listening to `conn` and clear its timers. */
  _detach(conn) {
    clearTimeout(conn.openTimer);
    clearInterval(conn.heartbeat);
    conn.ws.onopen = conn.ws.onmessage = conn.ws.onclose = conn.ws.onerror = null;
  }

  /** The end: reject everything pending, report `closed`. */
  _shutdown(code, reason, error) {
    this._closed = true;
    clearTimeout(this._retryTimer);
    this._conn = null;
    for (const record of [...this._pending.values()]) this._settle(record, error);
    this._readyReject(error);
    this._setState("closed", { code, reason });
  }

  /** Send app-level pings; drop the connection when nothing arrived for a whole interval. */
  _startHeartbeat(conn) {
    const interval = this._options.heartbeat;
    if (!interval) return;
    conn.heartbeat = setInterval(() => {
      if (conn.pingAt && conn.lastFrameAt < conn.pingAt) {
        // Any frame counts as a sign of life, not only the pong: with one request in
        // flight per connection the pong may wait behind a long streaming handler.
        this._drop(conn, 4000, `no pong within ${interval} ms`);
        return;
      }
      const sent = Date.now();
      conn.pingAt = sent;
      const id = this._nextId();
      conn.internal.set(id, (frame) => {
        if (frame.type === "pong") this.latency = Date.now() - sent;
      });
      this._write(conn, { id, type: "ping", content: { clientTime: sent } });
    }, interval);
  }

  // ----------------------------------------------------------------- helpers

  /** Register a user request and send it when connected. */
  _add(type, content, timeout, handlers) {
    const record = {
      id: this._nextId(),
      type,
      content,
      timeout: timeout ?? this._options.timeout,
      timer: null,
      chunks: 0,
      ...handlers,
    };
    if (this._closed) {
      const error = new BackchannelError("closed", "the client is closed", { clientSide: true });
      this._fail(record, error);
      return record;
    }
    const text = JSON.stringify({ id: record.id, type, content });
    const limit = this._options.maxMessageSize;
    if (this._encoder.encode(text).length > limit) {
      const error = new BackchannelError("too_large", `request is over ${limit} bytes`, { clientSide: true });
      this._fail(record, error);
      return record;
    }
    this._pending.set(record.id, record);
    this._arm(record);
    const conn = this._conn;
    if (conn && conn.ready) this._write(conn, { id: record.id, type, content });
    return record;
  }

  /** Reject a record that never became pending (asynchronously, like an answer). */
  _fail(record, error) {
    queueMicrotask(() => record.reject(error));
  }

  /** (Re)start a request's timeout. */
  _arm(record) {
    clearTimeout(record.timer);
    if (!(record.timeout > 0)) return;
    record.timer = setTimeout(() => {
      const error = new BackchannelError("timeout", `no answer within ${record.timeout} ms`, {
        replyTo: record.id,
        clientSide: true,
      });
      this._abandon(record, false, error); // forgotten, not cancelled (as the Python client)
    }, record.timeout);
  }

  /** Stop waiting for a request; optionally ask the server to cancel it. */
  _abandon(record, cancel, error) {
    if (!this._pending.has(record.id)) return;
    const conn = this._conn;
    if (cancel && conn && conn.ready) {
      const id = this._nextId();
      conn.internal.set(id, () => {});
      this._write(conn, { id, type: "cancel", content: { target: record.id } });
    }
    this._settle(record, error, {});
  }

  /** Settle a pending request once: resolve with `content`, or reject with `error`. */
  _settle(record, error, content, frame) {
    if (!this._pending.delete(record.id)) return;
    clearTimeout(record.timer);
    if (error) record.reject(error);
    else record.resolve(content, frame);
  }

  /** Write one request on an open socket (a closed one drops it: it stays pending). */
  _write(conn, message) {
    if (conn.ws.readyState !== OPEN) return;
    try {
      conn.ws.send(JSON.stringify(message));
    } catch {
      // the socket is closing; the close event brings the reconnect and the resend
    }
  }

  _nextId() {
    this._counter += 1;
    return this._idPrefix + this._counter;
  }

  _setState(state, info = {}) {
    this.state = state;
    this._call(this._options.onState, state, info);
  }

  /** Call a user callback; its exceptions never break the client. */
  _call(callback, ...args) {
    if (!callback) return;
    try {
      callback(...args);
    } catch (error) {
      console.error("backchannel: callback failed", error);
    }
  }
}

/**
 * A joined room, from {@link Client#subscribe}. Delivers the room's messages in
 * offset order, each once, across reconnects.
 */
export class Subscription {
  /**
   * @param {Client} client
   * @param {string} room
   * @param {(message: object, frame: object) => void} onMessage
   * @param {object} options see {@link Client#subscribe}
   */
  constructor(client, room, onMessage, options) {
    this.client = client;
    /** @type {string} */
    this.room = room;
    /** @type {string[]} principal ids in the room, kept current by presence events
     * (a large room, `rooms.large_room` on the server, sends neither: see `count`) */
    this.members = [];
    /** @type {number|null} members present, from the last join answer */
    this.count = null;
    /** @type {string|number|null} the room's epoch (offsets restart in a new one) */
    this.epoch = null;
    /** @type {number|null} the offset of the last message delivered (or the join offset) */
    this.offset = null;
    /** @type {boolean} */
    this.joined = false;
    this._onMessage = onMessage;
    this._options = options;
    this._seen = null; // offset of the last delivered message, in this epoch
    /** @type {Array<[object, object]>|null} messages held while a join is unanswered */
    this._held = [];
  }

  /**
   * Publish text to the room; resolves with the published message `{room, offset, epoch, from, text}`
   * (which is also delivered to this subscription's onMessage).
   * @param {string} text
   * @param {{timeout?: number}} [options]
   */
  publish(text, options = {}) {
    return this.client.request("text", { room: this.room, text }, options);
  }

  /** Ask the server who is in the room. */
  presence() {
    return this.client.presence(this.room);
  }

  /** Leave the room and stop receiving its messages. */
  async unsubscribe() {
    this.client._rooms.delete(this.room);
    this.joined = false;
    await this.client.request("leave", { room: this.room });
  }

  /** The answer to our first `join`. */
  _joined(content) {
    this.joined = true;
    this._answered(content);
  }

  /** A join's answer: its position and members, then the messages held meanwhile. */
  _answered(content) {
    this._position(content);
    if (Number.isInteger(content.count)) this.count = content.count;
    if (Array.isArray(content.members)) this._setMembers(content.members, null);
    const held = this._held ?? [];
    this._held = null;
    for (const [message, frame] of held) this._message(message, frame);
  }

  /** After a reconnect: join again from the last message seen. */
  _rejoin(conn) {
    const content = { room: this.room };
    if (this.epoch !== null && this.offset !== null) {
      content.since = { offset: this.offset, epoch: this.epoch };
    }
    const client = this.client;
    const id = client._nextId();
    if (this._held === null) this._held = [];
    conn.internal.set(id, (frame) => {
      if (client._rooms.get(this.room) !== this) return;
      if (frame.type === "error") {
        this._held = null;
        client._call(this._options.onError, BackchannelError.fromFrame(frame));
        return;
      }
      const c = frame.content || {};
      if (content.since && c.recovered === false) {
        this._seen = null; // what we saw belongs to history the server no longer covers
        client._call(this._options.onGap, {
          room: this.room,
          missed: c.missed,
          epoch: c.epoch,
          reason: "not_recovered",
        });
      }
      this._answered(c);
    });
    client._write(conn, { id, type: "join", content });
  }

  /** Take the room's epoch and current offset from a join answer. */
  _position(content) {
    if (content.epoch !== undefined && content.epoch !== this.epoch) {
      this.epoch = content.epoch;
      this._seen = null;
    }
    if (Number.isInteger(content.offset)) {
      this.offset = Math.max(content.offset, this._seen ?? -Infinity);
    }
  }

  /** A room message: held while a join is unanswered, else delivered unless seen. */
  _message(content, frame) {
    if (this._held !== null) {
      this._held.push([content, frame]);
      return;
    }
    if (content.epoch !== undefined && this.epoch !== null && content.epoch !== this.epoch) {
      // The room's history restarted while we were connected (e.g. the broker lost it).
      this.client._call(this._options.onGap, {
        room: this.room,
        epoch: content.epoch,
        reason: "epoch_changed",
      });
      this._seen = null;
    }
    if (content.epoch !== undefined) this.epoch = content.epoch;
    if (this._seen !== null && content.offset <= this._seen) return; // a replay we already have
    this._seen = content.offset;
    this.offset = Math.max(content.offset, this.offset ?? -Infinity);
    this.client._call(this._onMessage, content, frame);
  }

  /** `presence {room, event: join|leave, member}` from the server. */
  _presenceEvent(content) {
    const members = new Set(this.members);
    if (content.event === "join" && content.member) members.add(content.member);
    if (content.event === "leave") members.delete(content.member);
    this._setMembers([...members], content);
  }

  _setMembers(members, event) {
    this.members = [...members];
    this.client._call(this._options.onPresence, this.members, event);
  }
}
