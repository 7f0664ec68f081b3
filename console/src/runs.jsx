// Runs, newest first, following new ones as they are recorded; and one run's page.

import { useEffect, useRef, useState } from "preact/hooks";
import { api, query, tenantPath } from "./api.js";
import { Json, Problem, Status, Time, href, useLoad } from "./ui.jsx";

const POLL_MS = 2000;
const STATUSES = ["ok", "retrying", "dead_lettered", "failed", "skipped"];
const TRIGGERS = ["event", "schedule", "replay", "http"];

function Filters({ filters, setFilters }) {
  const set = (key) => (e) => setFilters({ ...filters, [key]: e.currentTarget.value });
  return (
    <form class="filters" onSubmit={(e) => e.preventDefault()} aria-label="Filter runs">
      <label>
        Script <input name="script" value={filters.script} onChange={set("script")} />
      </label>
      <label>
        Status
        <select name="status" value={filters.status} onChange={set("status")}>
          <option value="">any</option>
          {STATUSES.map((s) => <option value={s}>{s}</option>)}
        </select>
      </label>
      <label>
        Failure kind <input name="kind" value={filters.kind} onChange={set("kind")} placeholder="timeout, error…" />
      </label>
      <label>
        Trigger
        <select name="trigger" value={filters.trigger} onChange={set("trigger")}>
          <option value="">any</option>
          {TRIGGERS.map((t) => <option value={t}>{t}</option>)}
        </select>
      </label>
      <label>
        Since <input name="since" type="datetime-local" value={filters.since} onChange={set("since")} />
      </label>
    </form>
  );
}

function params(filters) {
  const since = filters.since ? new Date(filters.since).toISOString() : undefined;
  return { script: filters.script, status: filters.status, kind: filters.kind, trigger: filters.trigger, since };
}

function ms(value) {
  return `${Math.round(value * 10) / 10} ms`;
}

export function RunsPage({ tenant }) {
  const [filters, setFilters] = useState({ script: "", status: "", kind: "", trigger: "", since: "" });
  const [runs, setRuns] = useState([]);
  const [next, setNext] = useState(null);
  const [error, setError] = useState(null);
  const newest = useRef(0);
  useEffect(() => {
    let live = true;
    let timer;
    const base = tenantPath(tenant, "runs");
    const first = async () => {
      const page = await api("GET", base + query({ ...params(filters), limit: 50 }));
      if (!live) return;
      setRuns(page.runs);
      setNext(page.next);
      newest.current = page.runs.reduce((m, r) => Math.max(m, r.id), 0);
    };
    const follow = async () => {
      try {
        const page = await api("GET", base + query({ ...params(filters), after: newest.current, limit: 500 }));
        if (live && page.runs.length) {
          newest.current = page.runs.reduce((m, r) => Math.max(m, r.id), newest.current);
          setRuns((old) => [...page.runs, ...old].sort((a, b) => b.started_at.localeCompare(a.started_at) || b.id - a.id));
        }
        if (live) setError(null);
      } catch (e) {
        if (live) setError(e);
      }
      if (live) timer = setTimeout(follow, POLL_MS);
    };
    first().then(() => live && (timer = setTimeout(follow, POLL_MS)), (e) => live && setError(e));
    return () => {
      live = false;
      clearTimeout(timer);
    };
  }, [tenant, filters]);
  const older = async () => {
    try {
      const page = await api("GET", tenantPath(tenant, "runs") + query({ ...params(filters), before: next, limit: 50 }));
      setRuns((old) => [...old, ...page.runs]);
      setNext(page.next);
    } catch (e) {
      setError(e);
    }
  };
  return (
    <section>
      <h1>Runs</h1>
      <Filters filters={filters} setFilters={setFilters} />
      <Problem error={error} />
      <p class="hint" aria-live="polite">{runs.length} shown; new runs appear as they are recorded.</p>
      <table class="runs">
        <thead>
          <tr>
            <th>Run</th>
            {tenant === "*" && <th>Tenant</th>}
            <th>Script</th>
            <th>Status</th>
            <th>Trigger</th>
            <th>Attempt</th>
            <th>Started</th>
            <th>Duration</th>
            <th>Failure</th>
          </tr>
        </thead>
        <tbody>
          {runs.map((r) => (
            <tr key={r.id} data-run={r.id}>
              <td>
                <a href={href("runs", r.tenant, r.id)}>#{r.id}</a>
              </td>
              {tenant === "*" && <td>{r.tenant}</td>}
              <td>{r.script}{r.version ? ` v${r.version}` : ""}</td>
              <td><Status status={r.status} /></td>
              <td>{r.trigger}</td>
              <td>{r.attempt}</td>
              <td><Time at={r.started_at} /></td>
              <td>{ms(r.duration_ms)}</td>
              <td>{r.failure_kind || ""}</td>
            </tr>
          ))}
        </tbody>
      </table>
      {next && <button type="button" onClick={older}>Older runs</button>}
    </section>
  );
}

/** The runs of one job, one row per attempt. */
export function Attempts({ runs }) {
  return (
    <table>
      <thead><tr><th>Run</th><th>Attempt</th><th>Status</th><th>Started</th><th>Failure</th></tr></thead>
      <tbody>
        {runs.map((a) => (
          <tr key={a.id}>
            <td><a href={href("runs", a.tenant, a.id)}>#{a.id}</a></td>
            <td>{a.attempt}</td>
            <td><Status status={a.status} /></td>
            <td><Time at={a.started_at} /></td>
            <td>{a.failure_kind || ""}</td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}

export function RunPage({ tenant, id }) {
  const [run, error] = useLoad(() => api("GET", tenantPath(tenant, "runs", id)), [tenant, id]);
  const [attempts] = useLoad(
    () => (run ? api("GET", tenantPath(tenant, "runs") + query({ job: run.job_id, limit: 50 })) : Promise.resolve(null)),
    [run?.job_id],
  );
  if (error) return <Problem error={error} />;
  if (!run) return <p>Loading…</p>;
  return (
    <section>
      <h1>
        Run #{run.id} <Status status={run.status} />
      </h1>
      <dl class="facts">
        <dt>Tenant</dt><dd>{run.tenant}</dd>
        <dt>Script</dt><dd><a href={href("scripts", run.tenant, run.script)}>{run.script}</a>{run.version ? ` v${run.version}` : ""}</dd>
        <dt>Trigger</dt><dd>{run.trigger}{run.subject ? ` · ${run.subject}` : ""}</dd>
        <dt>Job</dt><dd>{run.job_id} · attempt {run.attempt}</dd>
        <dt>Started</dt><dd><Time at={run.started_at} /></dd>
        <dt>Duration</dt><dd>{ms(run.duration_ms)}{run.cold_start ? " (cold start)" : ""}</dd>
        <dt>Trace id</dt><dd class="mono">{run.trace_id || "— (traces are not exported)"}</dd>
      </dl>
      {run.failure_kind && (
        <div class="failure">
          <h2>Failure: {run.failure_kind}</h2>
          <pre aria-label="Failure message">{run.failure_message}</pre>
          {run.failure_stack && <pre aria-label="Stack">{run.failure_stack}</pre>}
        </div>
      )}
      <h2>Input</h2>
      <Json label="Input" value={run.input ?? (run.input_ref ? `${run.input_ref}: no longer in the events stream` : undefined)} />
      <h2>Result</h2>
      <Json label="Result" value={run.result} />
      <h2>Logs{run.logs_truncated ? " (truncated)" : ""}</h2>
      <ol class="logs" aria-label="Logs">
        {(run.logs || []).map((l) => (
          <li class={`log-${l.level || "info"}`}>
            <span class="level">{l.level}</span> {typeof l.message === "string" ? l.message : JSON.stringify(l)}
          </li>
        ))}
      </ol>
      <h2>Attempts of this job</h2>
      <Attempts runs={attempts?.runs || []} />
    </section>
  );
}
