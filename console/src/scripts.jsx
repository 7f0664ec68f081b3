// Scripts: each with its triggers, limits and versions (a diff between any two, rollback),
// enable and disable.

import { diffLines } from "diff";
import { useState } from "preact/hooks";
import { api, tenantPath } from "./api.js";
import { Problem, Time, href, useLoad } from "./ui.jsx";

export function triggers(s) {
  const parts = [...(s.subjects || [])];
  if (s.cron) parts.push(`cron ${s.cron} (${s.timezone})`);
  if (s.http) parts.push(`${s.http.method} ${s.http.path} (${s.http.auth || "token"})`);
  return parts.join(", ") || "none";
}

export function ScriptsPage({ tenant }) {
  const [scripts, error] = useLoad(() => api("GET", tenantPath(tenant, "scripts")), [tenant]);
  return (
    <section>
      <h1>Scripts</h1>
      <p><a href={href("scripts", tenant, "new", "edit")}>New script</a></p>
      <Problem error={error} />
      <table>
        <thead><tr><th>Name</th><th>Version</th><th>State</th><th>Triggers</th></tr></thead>
        <tbody>
          {(scripts || []).map((s) => (
            <tr key={s.name}>
              <td><a href={href("scripts", s.tenant, s.name)}>{s.name}</a></td>
              <td>v{s.version}</td>
              <td>{s.enabled ? "enabled" : "disabled"}</td>
              <td>{triggers(s)}</td>
            </tr>
          ))}
        </tbody>
      </table>
    </section>
  );
}

function Diff({ from, to }) {
  const parts = diffLines(from, to);
  return (
    <pre class="diff" aria-label="Diff" tabindex="0">
      {parts.map((p) => (
        <span class={p.added ? "added" : p.removed ? "removed" : ""}>
          {p.value.replace(/\n$/, "").split("\n").map((line) => `${p.added ? "+" : p.removed ? "-" : " "} ${line}\n`)}
        </span>
      ))}
    </pre>
  );
}

function Versions({ tenant, name, reloadScript }) {
  const [list, error, reload] = useLoad(() => api("GET", tenantPath(tenant, "scripts", name, "versions")), [tenant, name]);
  const [pair, setPair] = useState({ from: "", to: "" });
  const [sources, setSources] = useState(null);
  const [actionError, setActionError] = useState(null);
  const versions = list?.versions || [];
  const compare = async () => {
    setActionError(null);
    try {
      const [a, b] = await Promise.all(
        [pair.from, pair.to].map((v) => api("GET", tenantPath(tenant, "scripts", name, "versions", v))),
      );
      setSources({ from: a.source, to: b.source, label: `v${pair.from} → v${pair.to}` });
    } catch (e) {
      setActionError(e);
    }
  };
  const rollback = async (version) => {
    if (!window.confirm(`Make v${version} of ${name} current again?`)) return;
    try {
      await api("POST", tenantPath(tenant, "scripts", name, "rollback"), { version });
      reload();
      reloadScript();
    } catch (e) {
      setActionError(e);
    }
  };
  const pick = (key) => (e) => setPair({ ...pair, [key]: e.currentTarget.value });
  return (
    <div>
      <h2>Versions</h2>
      <Problem error={error || actionError} />
      <table>
        <thead><tr><th>Version</th><th>Deployed</th><th>SHA-256</th><th></th></tr></thead>
        <tbody>
          {versions.map((v) => (
            <tr key={v.version}>
              <td>v{v.version}{v.current ? " (current)" : ""}</td>
              <td><Time at={v.created_at} /></td>
              <td class="mono">{v.sha256.slice(0, 12)}</td>
              <td>{!v.current && <button type="button" onClick={() => rollback(v.version)}>Roll back to v{v.version}</button>}</td>
            </tr>
          ))}
        </tbody>
      </table>
      {versions.length > 1 && (
        <form class="filters" onSubmit={(e) => { e.preventDefault(); compare(); }}>
          <label>From <select value={pair.from} onChange={pick("from")} name="from">
            <option value="">—</option>{versions.map((v) => <option value={v.version}>v{v.version}</option>)}
          </select></label>
          <label>To <select value={pair.to} onChange={pick("to")} name="to">
            <option value="">—</option>{versions.map((v) => <option value={v.version}>v{v.version}</option>)}
          </select></label>
          <button type="submit" disabled={!pair.from || !pair.to}>Compare</button>
        </form>
      )}
      {sources && (<><h3>{sources.label}</h3><Diff from={sources.from} to={sources.to} /></>)}
    </div>
  );
}

export function ScriptPage({ tenant, name }) {
  const [script, error, reload] = useLoad(() => api("GET", tenantPath(tenant, "scripts", name)), [tenant, name]);
  const [schedules] = useLoad(() => api("GET", tenantPath(tenant, "schedules")), [tenant, script?.version]);
  const [actionError, setActionError] = useState(null);
  if (error) return <Problem error={error} />;
  if (!script) return <p>Loading…</p>;
  const next = schedules?.schedules.find((s) => s.name === name)?.next || [];
  const toggle = async () => {
    setActionError(null);
    try {
      await api("POST", tenantPath(tenant, "scripts", name, script.enabled ? "disable" : "enable"));
      reload();
    } catch (e) {
      setActionError(e);
    }
  };
  return (
    <section>
      <h1>{script.name} <small>v{script.version} · {script.enabled ? "enabled" : "disabled"}</small></h1>
      <p class="actions">
        <a class="button" href={href("scripts", tenant, name, "edit")}>Edit</a>
        <button type="button" onClick={toggle}>{script.enabled ? "Disable" : "Enable"}</button>
        <a href={href("runs")}>Runs</a>
      </p>
      <Problem error={actionError} />
      <h2>Triggers</h2>
      <dl class="facts">
        <dt>Subjects</dt><dd>{script.subjects?.length ? script.subjects.join(", ") : "none"}</dd>
        <dt>Schedule</dt><dd>{script.cron ? `${script.cron} (${script.timezone}), overlap ${script.overlap}, catch-up ${script.catch_up}` : "none"}</dd>
        {script.cron && (<><dt>Next</dt><dd><ul class="plain">{next.map((t) => <li><Time at={t} /></li>)}</ul></dd></>)}
        <dt>HTTP</dt><dd>{script.http ? `${script.http.method} /hooks/${tenant}${script.http.path} (${script.http.auth || "token"})` : "none"}</dd>
      </dl>
      <h2>Limits and retries</h2>
      <dl class="facts">
        {Object.entries(script.limits || {}).map(([k, v]) => (<><dt>{k}</dt><dd>{String(v)}</dd></>))}
        {Object.entries(script.retry || {}).map(([k, v]) => (<><dt>retry {k}</dt><dd>{String(v)}</dd></>))}
        {!Object.keys(script.limits || {}).length && !Object.keys(script.retry || {}).length && (<><dt>Own settings</dt><dd>none: the daemon's defaults apply</dd></>)}
      </dl>
      <Versions tenant={tenant} name={name} reloadScript={reload} />
    </section>
  );
}
