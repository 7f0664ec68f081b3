// The sandbox every script isolate starts from (baked into the startup snapshot): a console
// that writes into the run record, the `ctx` given to handlers, and the host's entry point
// that runs a handler and turns its result into bounded JSON. `seal()` runs once in every new
// isolate and removes everything of the host a script must not reach.
import { core } from "ext:core/mod.js";
import {
  op_decode,
  op_encode,
  op_scriptd_fetch,
  op_scriptd_kv_delete,
  op_scriptd_kv_get,
  op_scriptd_kv_list,
  op_scriptd_kv_set,
  op_scriptd_log,
  op_scriptd_publish,
  op_scriptd_secret,
} from "ext:core/ops";

const { freeze, keys } = Object;
const SetCtor = Set;
const { stringify, parse } = JSON;
const { isArray } = Array;
const promiseReject = Promise.reject.bind(Promise);
const StringCtor = String;
const ErrorCtor = Error;
const TypeErrorCtor = TypeError;
const MapCtor = Map;
const Uint8ArrayCtor = Uint8Array;
const ArrayBufferCtor = ArrayBuffer;
const { isView } = ArrayBuffer;
const hasOwn = Object.prototype.hasOwnProperty;
const call = Function.prototype.call;
const hasOwnProperty = (o, k) => call.call(hasOwn, o, k);

function formatValue(value, depth) {
  if (typeof value === "string") return value;
  if (value instanceof ErrorCtor) return value.stack ?? `${value.name}: ${value.message}`;
  if (typeof value === "function") return `[Function ${value.name || "anonymous"}]`;
  if (typeof value === "bigint") return `${value}n`;
  if (typeof value === "symbol" || value === undefined) return StringCtor(value);
  if (typeof value !== "object" || value === null) return StringCtor(value);
  try {
    return stringify(value) ?? StringCtor(value);
  } catch {
    return depth > 0 ? "[Object]" : StringCtor(value);
  }
}

function format(args) {
  let out = "";
  for (let i = 0; i < args.length; i++) {
    if (i > 0) out += " ";
    out += formatValue(args[i], 1);
  }
  return out;
}

const logAt = (level) => (...args) => op_scriptd_log(level, format(args));

const console = freeze({
  log: logAt("info"),
  info: logAt("info"),
  debug: logAt("debug"),
  warn: logAt("warn"),
  error: logAt("error"),
  trace: logAt("debug"),
});

// Whether the JSON of `value` would be larger than `budget`, walking no further than the
// budget: a result that is too large is refused before it is copied. Strings count their
// UTF-16 length (at most their UTF-8 length); the host checks the exact byte count again.
// Throws TypeError on a cycle and RangeError when nesting exhausts the stack, as
// JSON.stringify would.
function exceedsBudget(value, budget) {
  let used = 0;
  const path = new SetCtor();
  const walk = (v) => {
    if (v !== null && typeof v === "object" && typeof v.toJSON === "function") {
      v = v.toJSON();
    }
    if (typeof v === "string") {
      used += v.length + 2;
      return used > budget;
    }
    if (v === null || typeof v !== "object") {
      used += 8;
      return used > budget;
    }
    if (path.has(v)) throw new TypeError("the value contains a cycle");
    path.add(v);
    if (isArray(v)) {
      used += 2 + v.length;
      for (let i = 0; i < v.length; i++) if (walk(v[i])) return true;
    } else {
      used += 2;
      for (const k of keys(v)) {
        used += k.length + 4;
        if (walk(v[k])) return true;
      }
    }
    path.delete(v);
    return used > budget;
  };
  return walk(value);
}

// Errors of the script API, by the class names the host's ops raise.
for (const name of ["PermissionDenied", "LimitExceeded", "TimeoutError", "NotSupported"]) {
  const ErrorClass = class extends ErrorCtor {
    constructor(message) {
      super(message);
      this.name = name;
    }
  };
  core.registerErrorClass(name, ErrorClass);
}

// Header pairs from a plain object, an array of pairs or a Headers-like object.
function headerPairs(init, what) {
  if (init === undefined || init === null) return [];
  const pairs = [];
  if (isArray(init)) {
    for (const pair of init) {
      if (!isArray(pair) || pair.length !== 2) throw new TypeErrorCtor(`${what}: headers must be [name, value] pairs`);
      pairs.push([StringCtor(pair[0]), StringCtor(pair[1])]);
    }
  } else if (typeof init === "object" && typeof init.entries === "function") {
    for (const [name, value] of init.entries()) pairs.push([StringCtor(name), StringCtor(value)]);
  } else if (typeof init === "object") {
    for (const name of keys(init)) pairs.push([name, StringCtor(init[name])]);
  } else {
    throw new TypeErrorCtor(`${what}: headers must be an object`);
  }
  return pairs;
}

function makeHeaders(pairs) {
  const map = new MapCtor();
  for (const [name, value] of pairs) {
    const key = name.toLowerCase();
    map.set(key, map.has(key) ? `${map.get(key)}, ${value}` : value);
  }
  return freeze({
    get: (name) => map.get(StringCtor(name).toLowerCase()) ?? null,
    has: (name) => map.has(StringCtor(name).toLowerCase()),
    entries: () => map.entries(),
    keys: () => map.keys(),
    values: () => map.values(),
    forEach: (fn) => map.forEach((value, key) => fn(value, key)),
    [Symbol.iterator]: () => map.entries(),
  });
}

function makeResponse(reply) {
  let used = false;
  const take = () => {
    if (used) throw new TypeErrorCtor("the response body was already read");
    used = true;
    return reply.body;
  };
  return freeze({
    status: reply.status,
    statusText: reply.statusText,
    ok: reply.status >= 200 && reply.status < 300,
    url: reply.url,
    redirected: reply.redirected,
    headers: makeHeaders(reply.headers),
    get bodyUsed() {
      return used;
    },
    text: async () => op_decode(take()),
    json: async () => parse(op_decode(take())),
    arrayBuffer: async () => {
      const bytes = take();
      return bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
    },
  });
}

function bodyBytes(body) {
  if (body === undefined || body === null) return new Uint8ArrayCtor(0);
  if (typeof body === "string") return op_encode(body);
  if (body instanceof ArrayBufferCtor) return new Uint8ArrayCtor(body);
  if (isView(body)) return new Uint8ArrayCtor(body.buffer, body.byteOffset, body.byteLength);
  throw new TypeErrorCtor("fetch: the body must be a string, an ArrayBuffer or a typed array (JSON.stringify objects)");
}

// A subset of the standard fetch: method, headers, body, redirect; the response has
// status, statusText, ok, url, redirected, headers, text(), json() and arrayBuffer().
async function fetch(input, init = {}) {
  const url = typeof input === "string" ? input : input?.url ?? StringCtor(input);
  const redirect = init.redirect ?? "follow";
  if (redirect !== "follow" && redirect !== "manual" && redirect !== "error") {
    throw new TypeErrorCtor(`fetch: redirect must be "follow", "manual" or "error", not ${redirect}`);
  }
  const headers = headerPairs(init.headers, "fetch");
  if (typeof init.body === "string" && !headers.some(([name]) => name.toLowerCase() === "content-type")) {
    headers.push(["content-type", "text/plain;charset=UTF-8"]);
  }
  const args = {
    url: StringCtor(url),
    method: StringCtor(init.method ?? "GET"),
    headers,
    redirect: redirect === "follow" ? "follow" : "manual",
  };
  const reply = await op_scriptd_fetch(args, bodyBytes(init.body));
  if (redirect === "error" && reply.status >= 300 && reply.status < 400) {
    throw new TypeErrorCtor(`fetch: ${args.url} redirected and redirect is "error"`);
  }
  return makeResponse(reply);
}

const keyOf = (key, what) => {
  if (typeof key !== "string") throw new TypeErrorCtor(`${what}: keys are strings`);
  return key;
};

const kv = freeze({
  get: async (key) => {
    const json = await op_scriptd_kv_get(keyOf(key, "ctx.kv.get"));
    return json === null ? undefined : parse(json);
  },
  set: async (key, value) => {
    const json = value === undefined ? undefined : stringify(value);
    if (json === undefined) {
      throw new TypeErrorCtor("ctx.kv.set: the value must be JSON-serialisable (use ctx.kv.delete to remove a key)");
    }
    await op_scriptd_kv_set(keyOf(key, "ctx.kv.set"), json);
  },
  delete: (key) => op_scriptd_kv_delete(keyOf(key, "ctx.kv.delete")),
  list: (prefix = "", options = {}) => op_scriptd_kv_list(StringCtor(prefix), options?.limit ?? 0),
});

const secrets = freeze({
  get: async (name) => (await op_scriptd_secret(StringCtor(name))) ?? undefined,
});

async function publish(type, data, options = {}) {
  if (typeof type !== "string") throw new TypeErrorCtor("ctx.publish: the event type must be a string");
  const json = stringify(data === undefined ? null : data);
  const subject = await op_scriptd_publish(type, json, headerPairs(options?.headers, "ctx.publish"));
  return { subject };
}

function makeCtx(tenant, script, version, attempt) {
  return freeze({
    tenant,
    script,
    version,
    attempt,
    log: logAt("info"),
    publish,
    kv,
    secrets,
  });
}

// Calls the handler with its event and a `ctx` of `makeCtx` (frozen and holding nothing of
// one run, so the host keeps one per isolate and attempt number). What the handler returns
// (from an async handler, a promise, usually settled already) goes back to the host, which
// takes a settled value through `finish` at once and leaves anything else to `settle`. A
// handler that throws at once is treated as one whose promise rejects.
function start(handler, eventJson, ctx) {
  try {
    return handler(parse(eventJson), ctx);
  } catch (e) {
    return promiseReject(e);
  }
}

// Waits for what the handler returned, then as `finish`. User exceptions propagate (the host
// classifies them).
async function settle(returned, resultLimit) {
  return finish(await returned, resultLimit);
}

// What an exception thrown while reading a result says, whatever it is.
function messageOf(e) {
  try {
    return `${e?.message ?? e}`;
  } catch {
    return "an exception whose message cannot be read";
  }
}

// The handler's value as the host takes it: its JSON text, or `[kind, message]` for a result
// the host refuses. (A string reaches the host as one string, not an object to decode.)
function finish(value, resultLimit) {
  if (value === undefined) return "null";
  try {
    if (exceedsBudget(value, resultLimit)) {
      return ["result_too_large", `the return value is larger than ${resultLimit} bytes as JSON`];
    }
  } catch (e) {
    return ["result_not_serialisable", `the return value is not JSON-serialisable: ${messageOf(e)}`];
  }
  let json;
  try {
    json = stringify(value);
  } catch (e) {
    return ["result_not_serialisable", `the return value is not JSON-serialisable: ${messageOf(e)}`];
  }
  return json ?? "null";
}

// Looks up the module's default export as the handler.
function handlerOf(namespace) {
  if (!hasOwnProperty(namespace, "default")) {
    return "the module has no default export; write `export default async function (event, ctx) { ... }`";
  }
  if (typeof namespace.default !== "function") {
    return `the default export is a ${typeof namespace.default}, not a function`;
  }
  return namespace.default;
}

function seal() {
  delete globalThis.__scriptd_seal;
  delete globalThis.Deno;
  delete globalThis.__bootstrap;
  delete globalThis.__infra;
  // WebAssembly code runs outside the reach of the engine's termination on some engines, and
  // Atomics.wait blocks the thread: neither has a place in an event handler.
  delete globalThis.WebAssembly;
  if (globalThis.Atomics) {
    delete globalThis.Atomics.wait;
    delete globalThis.Atomics.waitAsync;
    // With no waiting there is nothing to notify (the offline engine's version also calls
    // one of its internals, removed below).
    delete globalThis.Atomics.notify;
  }
  // What one engine adds beyond the language and the documented API is removed, so every
  // engine shows scripts the same global object: the offline engine's internals
  // (`__v8x*`), its `gc()`, and its own additions. `ShadowRealm` would give a script a new
  // realm whose code generation from strings is not switched off; `Temporal` is not
  // built into the production engine.
  for (const name of Object.getOwnPropertyNames(globalThis)) {
    if (name.startsWith("__v8x")) {
      delete globalThis[name];
    }
  }
  for (const name of ["gc", "InternalError", "ShadowRealm", "Temporal"]) {
    delete globalThis[name];
  }
  for (const [name, value] of [["console", console], ["fetch", fetch]]) {
    Object.defineProperty(globalThis, name, {
      value,
      writable: true,
      enumerable: false,
      configurable: true,
    });
  }
  return { start, settle, finish, handlerOf, makeCtx };
}

globalThis.__scriptd_seal = seal;
