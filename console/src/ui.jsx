// Small pieces every page uses: status badges, times, JSON blocks, errors, the hash router.

import { useEffect, useState } from "preact/hooks";

export function Status({ status }) {
  return <span class={`badge status-${status}`}>{status.replace("_", " ")}</span>;
}

export function Time({ at }) {
  if (!at) return <span>—</span>;
  const d = new Date(at);
  return <time datetime={at} title={d.toISOString()}>{d.toLocaleString()}</time>;
}

export function Json({ value, label }) {
  const text = value === undefined ? "—" : JSON.stringify(value, null, 2);
  return (
    <pre class="json" aria-label={label} tabindex="0">
      {text}
    </pre>
  );
}

/** An API error as the user sees it: what failed, and the fields the problem names. */
export function Problem({ error }) {
  if (!error) return null;
  const fields = (error.problem?.errors || []).map((e) => e.pointer || e.parameter).filter(Boolean);
  return (
    <div class="problem" role="alert">
      <strong>{error.problem?.title || "Error"}</strong> {error.message}
      {fields.length > 0 && <span> ({fields.join(", ")})</span>}
    </div>
  );
}

/** The page's location after `#`, as path parts, updated on navigation. */
export function useHash() {
  const read = () => window.location.hash.replace(/^#\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  const [parts, setParts] = useState(read());
  useEffect(() => {
    const changed = () => setParts(read());
    window.addEventListener("hashchange", changed);
    return () => window.removeEventListener("hashchange", changed);
  }, []);
  return parts;
}

export function href(...parts) {
  return `#/${parts.map((p) => encodeURIComponent(p)).join("/")}`;
}

/** Loads `load()` when `deps` change; `[value, error, reload]`. */
export function useLoad(load, deps) {
  const [state, setState] = useState({ value: undefined, error: null });
  const [turn, setTurn] = useState(0);
  useEffect(() => {
    let live = true;
    load().then(
      (value) => live && setState({ value, error: null }),
      (error) => live && setState({ value: undefined, error }),
    );
    return () => {
      live = false;
    };
  }, [...deps, turn]);
  return [state.value, state.error, () => setTurn((t) => t + 1)];
}
