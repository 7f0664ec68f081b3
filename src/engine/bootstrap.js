// The sandbox every script isolate starts from (baked into the startup snapshot): a console
// that writes into the run record, the `ctx` given to handlers, and the host's entry point
// that runs a handler and turns its result into bounded JSON. `seal()` runs once in every new
// isolate and removes everything of the host a script must not reach.
import { op_scriptd_log } from "ext:core/ops";

const { freeze, keys } = Object;
const SetCtor = Set;
const { stringify, parse } = JSON;
const { isArray } = Array;
const StringCtor = String;
const ErrorCtor = Error;
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

function makeCtx(meta) {
  return freeze({
    tenant: meta.tenant,
    script: meta.script,
    version: meta.version,
    attempt: meta.attempt,
    log: logAt("info"),
  });
}

// Runs one handler. User exceptions propagate (the host classifies them); a result the host
// refuses is reported as `{ error: [kind, message] }`.
async function invoke(handler, eventJson, metaJson, resultLimit) {
  const meta = parse(metaJson);
  const value = await handler(parse(eventJson), makeCtx(meta));
  if (value === undefined) return { json: "null" };
  try {
    if (exceedsBudget(value, resultLimit)) {
      return { error: ["result_too_large", `the return value is larger than ${resultLimit} bytes as JSON`] };
    }
  } catch (e) {
    return { error: ["result_not_serialisable", `the return value is not JSON-serialisable: ${e?.message ?? e}`] };
  }
  let json;
  try {
    json = stringify(value);
  } catch (e) {
    return { error: ["result_not_serialisable", `the return value is not JSON-serialisable: ${e.message}`] };
  }
  return { json: json ?? "null" };
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
  }
  Object.defineProperty(globalThis, "console", {
    value: console,
    writable: true,
    enumerable: false,
    configurable: true,
  });
  return { invoke, handlerOf };
}

globalThis.__scriptd_seal = seal;
