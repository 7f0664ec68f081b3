// Types of what a scriptd handler is given and may call (`scriptd types > scriptd.d.ts`).
// A handler imports them for checking only; `import type` is removed when the script is
// compiled, so nothing is imported at run time:
//
//   import type { Handler } from "scriptd";
//   const handler: Handler<{ id: string }> = async (event, ctx) => { ... };
//   export default handler;

declare module "scriptd" {
  /** JSON as scripts send and receive it. */
  export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

  /** An event from NATS, as the handler receives it. */
  export interface Event<Data = Json> {
    /** The publisher's Nats-Msg-Id, else `<stream>-<sequence>`; stable across redeliveries. */
    id: string;
    /** The tenant-relative type (`order.created`). */
    type: string;
    /** The full NATS subject. */
    subject: string;
    /** The tenant the event belongs to (always the script's own). */
    tenant: string;
    /** The payload: parsed JSON, a string for other UTF-8, base64 for other bytes. */
    data: Data;
    encoding: "json" | "text" | "base64";
    /** The message's headers (first value of each), JetStream's own excluded. */
    headers: Record<string, string>;
    /** When JetStream stored the event (RFC 3339). */
    time: string;
  }

  /** What a cron-scheduled script receives instead of an event. */
  export interface ScheduleEvent {
    type: "schedule";
    id: string;
    tenant: string;
    cron: string;
    timezone: string;
    /** The occurrence this run is for (RFC 3339). */
    scheduledAt: string;
    /** When the occurrence was fired (RFC 3339). */
    firedAt: string;
    /** Whether the occurrence was missed while no daemon ran and is caught up now. */
    missed: boolean;
  }

  export interface PublishOptions {
    /** Extra headers; `Nats-*`, `Scriptd-*`, `traceparent` and `tracestate` are reserved. */
    headers?: Record<string, string>;
  }

  export interface KeyValue {
    /** The tenant's stored value, or undefined. */
    get<T = Json>(key: string): Promise<T | undefined>;
    /** Stores any JSON-serialisable value (not undefined), within the tenant's quota. */
    set(key: string, value: Json): Promise<void>;
    /** Whether the key existed. */
    delete(key: string): Promise<boolean>;
    /** The tenant's keys starting with `prefix`, sorted, at most `limit`. */
    list(prefix?: string, options?: { limit?: number }): Promise<string[]>;
  }

  export interface Secrets {
    /** The tenant's secret, or undefined. Values read are masked in logs and records. */
    get(name: string): Promise<string | undefined>;
  }

  export interface Context {
    tenant: string;
    script: string;
    version: number;
    /** 1 for the first try, 2 for the first retry, ... */
    attempt: number;
    /** Same as console.log. */
    log(...args: unknown[]): void;
    /** Publishes `data` as JSON on `<events prefix>.<own tenant>.<type>`. */
    publish(type: string, data: Json, options?: PublishOptions): Promise<{ subject: string }>;
    kv: KeyValue;
    secrets: Secrets;
  }

  /** A handler: its result must be JSON-serialisable (undefined is recorded as null). */
  export type Handler<Data = Json, Result = Json | void> = (
    event: Event<Data>,
    ctx: Context,
  ) => Result | Promise<Result>;

  /** A scheduled handler. */
  export type ScheduledHandler<Result = Json | void> = (
    event: ScheduleEvent,
    ctx: Context,
  ) => Result | Promise<Result>;

  /** The `name` of errors the script API throws; catch them and compare. */
  export type ApiErrorName =
    | "TypeError"
    | "PermissionDenied"
    | "LimitExceeded"
    | "TimeoutError"
    | "NotSupported"
    | "Error";
}

// The fetch subset every script has as a global.

interface ScriptdFetchHeaders {
  get(name: string): string | null;
  has(name: string): boolean;
  entries(): IterableIterator<[string, string]>;
  forEach(callback: (value: string, name: string) => void): void;
}

interface ScriptdFetchResponse {
  readonly status: number;
  readonly statusText: string;
  readonly ok: boolean;
  readonly url: string;
  readonly redirected: boolean;
  readonly headers: ScriptdFetchHeaders;
  /** Each body reader may be called once. */
  text(): Promise<string>;
  json<T = unknown>(): Promise<T>;
  arrayBuffer(): Promise<ArrayBuffer>;
}

interface ScriptdFetchInit {
  method?: string;
  headers?: Record<string, string> | [string, string][];
  body?: string | ArrayBuffer | ArrayBufferView;
  redirect?: "follow" | "manual" | "error";
}

/** Only hosts on the tenant's allow list; see docs/scripts.md. (`console` is the usual one:
 * log, info, debug, warn, error, trace, captured into the run's record.) */
declare function fetch(url: string, init?: ScriptdFetchInit): Promise<ScriptdFetchResponse>;
