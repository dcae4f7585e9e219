/**
 * Type declarations of backchannel.js (the browser and Node client).
 *
 * The client's API is declared here by hand, from backchannel.js's JSDoc; the message
 * contracts (`Requests`: each request type's content, reply, chunks and error codes)
 * are generated into contracts.d.ts from docs/asyncapi.json (`npm run generate`), so
 * `client.request("join", { room })` is checked against the server's schemas. A type
 * that `Requests` does not list still works: its content and reply are plain objects.
 */
import type { CommonErrorCode, ErrorCode, Requests, ServerFrame, TextReply } from "./contracts.js";

export type * from "./contracts.js";

/** The WebSocket subprotocol of wire protocol v1. */
export declare const PROTOCOL: "backchannel.v1";
/** This client's version (sent in `init.client`). */
export declare const VERSION: string;

/** A request type the server's contract describes. */
export type RequestType = keyof Requests;
/** The content a request of type `T` sends. */
export type RequestContent<T extends RequestType> = Requests[T]["content"];
/** What `client.request(T, …)` resolves with: the answer's content (`{}` for an ack). */
export type ReplyContent<T extends RequestType> = Requests[T]["reply"];
/** The content of each `chunk` of a streaming request of type `T`. */
export type ChunkContent<T extends RequestType> = Requests[T]["chunk"];
/** Client-side error codes (`clientSide` is true). */
export type ClientErrorCode = "timeout" | "connect_failed" | "closed" | "too_large" | "interrupted";

/** A request that failed: an `error` frame from the server, or a client-side failure. */
export declare class BackchannelError extends Error {
  constructor(
    code: ErrorCode | ClientErrorCode,
    message: string,
    extra?: {
      details?: object[];
      retryAfter?: number;
      ref?: string;
      replyTo?: string | null;
      clientSide?: boolean;
    },
  );
  readonly name: "BackchannelError";
  code: ErrorCode | ClientErrorCode;
  /** JSON paths and broken rules (`validation_failed`). */
  details?: { path?: string; rule?: string }[];
  /** Seconds to wait before retrying (`rate_limited`, `overloaded`). */
  retryAfter?: number;
  /** Matches the server's log line (`handler_error`). */
  ref?: string;
  /** The request id this error answers. */
  replyTo?: string | null;
  /** True when the client, not the server, raised it. */
  clientSide: boolean;
  /** The error an `error` frame carries. */
  static fromFrame(frame: ServerFrame): BackchannelError;
}

/** Retry delays: attempt n waits random() * min(maximum, initial * factor^(n-1)) ms. */
export interface Backoff {
  initial?: number;
  maximum?: number;
  factor?: number;
  /** Give up (state `closed`) after this many reconnect attempts in a row. */
  maxAttempts?: number;
}

/** Connection states reported through `onState`. */
export type State = "connecting" | "connected" | "reconnecting" | "resumed" | "resynced" | "closed";

/** A WebSocket class: the browser's, or the `ws` package's on Node. */
export type WebSocketClass = new (url: string, protocols?: string | string[], options?: object) => unknown;

export interface ConnectOptions {
  /** Credential, sent in `init` (never in the URL). */
  token?: string;
  /** Called before every connection's `init` and on a `token_expiring` notice. */
  tokenProvider?: () => string | Promise<string>;
  /** Re-open lost connections (default true). */
  reconnect?: boolean;
  backoff?: Backoff;
  /** Ms between app-level pings; 0 disables (default 15000). */
  heartbeat?: number;
  /** Default request timeout in ms, reconnects included (default 30000). */
  timeout?: number;
  /** Ms for a connection to open and answer `init` (default 10000). */
  connectTimeout?: number;
  /** Largest request in bytes (default 65536, the server's default). */
  maxMessageSize?: number;
  onState?: (state: State, info: Record<string, unknown>) => void;
  /** Server frames that answer no request and belong to no subscribed room. */
  onMessage?: (frame: ServerFrame) => void;
  WebSocket?: WebSocketClass;
  /** The handshake's `Origin` (needs a WebSocket class that takes options, such as `ws`). */
  origin?: string;
  /** More handshake headers (same condition). */
  headers?: Record<string, string>;
  /** Jitter source in [0, 1). */
  random?: () => number;
}

export interface RequestOptions {
  /** Ms before rejecting with `timeout` (between two chunks when streaming). */
  timeout?: number;
}

/** The async iterator of a streaming request, with the request's id. */
export interface Stream<T> extends AsyncIterableIterator<T> {
  readonly id: string;
}

/** A room message as members receive it (and the sender, as the reply). */
export type RoomMessage = TextReply & { room: string; offset: number; epoch: string };

export interface Gap {
  room: string;
  missed?: number;
  epoch?: string;
  reason: "not_recovered" | "epoch_changed";
}

export interface SubscribeOptions extends RequestOptions {
  onPresence?: (members: string[], event: Record<string, unknown> | null) => void;
  onGap?: (info: Gap) => void;
  onError?: (error: BackchannelError) => void;
}

/** One logical client: a session that outlives its WebSocket connections. */
export declare class Client {
  constructor(url: string, options?: ConnectOptions);
  readonly url: string;
  state: State;
  sessionId: string | null;
  lastSeq: number;
  principal: string | null;
  /** Round-trip time in ms of the last app-level ping. */
  latency: number | null;
  /** Resolves when the first connection answered `init`. */
  readonly ready: Promise<void>;
  /**
   * Send a request; resolve with its terminal answer's content (`{}` for an ack). A type
   * `Requests` lists is checked against its contract; any other takes a plain object.
   */
  request<T extends string>(
    type: T,
    content?: T extends RequestType ? RequestContent<T> : Record<string, unknown>,
    options?: RequestOptions,
  ): Promise<T extends RequestType ? ReplyContent<T> : Record<string, unknown>>;
  /** Send a request whose handler streams; iterate its chunks' contents. */
  stream<T extends string>(
    type: T,
    content?: T extends RequestType ? RequestContent<T> : Record<string, unknown>,
    options?: RequestOptions,
  ): Stream<T extends RequestType ? ChunkContent<T> : Record<string, unknown>>;
  /** Join a room and receive its messages, in offset order, each once. */
  subscribe(
    room: string,
    onMessage: (message: RoomMessage, frame: ServerFrame) => void,
    options?: SubscribeOptions,
  ): Promise<Subscription>;
  /** Who is in a room (principal ids). */
  presence(room: string, options?: RequestOptions): Promise<string[]>;
  /** Close the client for good: pending requests reject with `closed`. */
  close(code?: number, reason?: string): void;
  /** The delay before reconnect attempt `attempt`, in ms. */
  backoffDelay(attempt: number): number;
}

/** A joined room, from `client.subscribe`. */
export declare class Subscription {
  readonly client: Client;
  readonly room: string;
  members: string[];
  epoch: string | number | null;
  offset: number | null;
  joined: boolean;
  /** Publish text to the room; resolves with the stored message. */
  publish(text: string, options?: RequestOptions): Promise<ReplyContent<"text">>;
  presence(): Promise<string[]>;
  unsubscribe(): Promise<void>;
}

/** Open a client and wait until its first connection answered `init`. */
export declare function connect(url: string, options?: ConnectOptions): Promise<Client>;

/** The error codes a request of type `T` may be answered with. */
export type RequestErrorCode<T extends RequestType> = Requests[T]["errors"] | CommonErrorCode;
