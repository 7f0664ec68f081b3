// Dead letters: the failure of each, a replay (dry run first) with the version to run, and
// purge with confirmation.

import { useState } from "preact/hooks";
import { api, query, tenantPath } from "./api.js";
import { Attempts } from "./runs.jsx";
import { Json, Problem, Time, href, useLoad } from "./ui.jsx";

export function DeadLettersPage({ tenant }) {
  const [filter, setFilter] = useState({ script: "", kind: "" });
  const [letters, error, reload] = useLoad(
    () => api("GET", tenantPath(tenant, "dead-letters") + query({ ...filter, limit: 200 })),
    [tenant, filter],
  );
  const [purge, setPurge] = useState(null);
  const [purgeError, setPurgeError] = useState(null);
  const set = (key) => (e) => setFilter({ ...filter, [key]: e.currentTarget.value });
  const askPurge = async () => {
    setPurgeError(null);
    try {
      const counted = await api("POST", tenantPath(tenant, "dead-letters", "purge"), { ...clean(filter), confirm: false });
      setPurge(counted);
    } catch (e) {
      setPurgeError(e);
    }
  };
  const confirmPurge = async () => {
    try {
      const done = await api("POST", tenantPath(tenant, "dead-letters", "purge"), { ...clean(filter), confirm: true });
      setPurge({ ...done, done: true });
      reload();
    } catch (e) {
      setPurgeError(e);
    }
  };
  const list = letters?.dead_letters || [];
  return (
    <section>
      <h1>Dead letters</h1>
      <form class="filters" onSubmit={(e) => e.preventDefault()} aria-label="Filter dead letters">
        <label>Script <input name="script" value={filter.script} onChange={set("script")} /></label>
        <label>Failure kind <input name="kind" value={filter.kind} onChange={set("kind")} /></label>
        <button type="button" onClick={reload}>Refresh</button>
        <button type="button" class="danger" onClick={askPurge}>Purge matching…</button>
      </form>
      <Problem error={error || purgeError} />
      {purge && !purge.done && (
        <div class="confirm" role="alertdialog" aria-label="Confirm purge">
          <p>{purge.matching} dead letter(s) match. Delete them for good?</p>
          <button type="button" class="danger" onClick={confirmPurge}>Delete {purge.matching}</button>
          <button type="button" onClick={() => setPurge(null)}>Cancel</button>
        </div>
      )}
      {purge?.done && <p role="status">Deleted {purge.deleted} dead letter(s).</p>}
      {letters && list.length === 0 && <p>No dead letters.</p>}
      <table>
        <thead>
          <tr><th>Letter</th><th>Script</th><th>Failure</th><th>Attempts</th><th>Stored</th></tr>
        </thead>
        <tbody>
          {list.map((d) => (
            <tr key={d.sequence} data-letter={d.sequence}>
              <td><a href={href("dead-letters", d.letter.tenant, d.sequence)}>#{d.sequence}</a></td>
              <td>{d.letter.script}</td>
              <td>{d.letter.failure.kind}: {short(d.letter.failure.message)}</td>
              <td>{d.letter.attempts}</td>
              <td><Time at={d.stored_at} /></td>
            </tr>
          ))}
        </tbody>
      </table>
    </section>
  );
}

function clean(filter) {
  return Object.fromEntries(Object.entries(filter).filter(([, v]) => v));
}

function short(text = "") {
  return text.length > 120 ? `${text.slice(0, 117)}…` : text;
}

export function DeadLetterPage({ tenant, sequence }) {
  const [found, error] = useLoad(() => api("GET", tenantPath(tenant, "dead-letters", sequence)), [tenant, sequence]);
  const [version, setVersion] = useState("latest");
  const [number, setNumber] = useState("");
  const [outcome, setOutcome] = useState(null);
  const [replayError, setReplayError] = useState(null);
  if (error) return <Problem error={error} />;
  if (!found) return <p>Loading…</p>;
  const letter = found.dead_letter.letter;
  const chosen = version === "number" ? number : version;
  const replay = async (dryRun) => {
    setReplayError(null);
    try {
      const answer = await api("POST", tenantPath(tenant, "dead-letters", sequence, "replay"), {
        version: chosen,
        dry_run: dryRun,
      });
      setOutcome(answer);
    } catch (e) {
      setReplayError(e);
    }
  };
  return (
    <section>
      <h1>Dead letter #{found.dead_letter.sequence}</h1>
      <dl class="facts">
        <dt>Script</dt><dd><a href={href("scripts", letter.tenant, letter.script)}>{letter.script}</a>{letter.script_version ? ` v${letter.script_version}` : ""}</dd>
        <dt>Job</dt><dd>{letter.job_id}</dd>
        <dt>Attempts</dt><dd>{letter.attempts}</dd>
        <dt>First attempt</dt><dd><Time at={letter.first_attempt_at} /></dd>
        <dt>Last attempt</dt><dd><Time at={letter.last_attempt_at} /></dd>
      </dl>
      <div class="failure">
        <h2>Failure: {letter.failure.kind}</h2>
        <pre aria-label="Failure message">{letter.failure.message}</pre>
        {letter.failure.stack && <pre aria-label="Stack">{letter.failure.stack}</pre>}
      </div>
      <h2>Replay</h2>
      {outcome?.job ? (
        <p role="status">Replayed as job {outcome.job}; the dead letter is gone. <a href={href("runs")}>Watch the runs</a></p>
      ) : (
        <form class="replay" onSubmit={(e) => e.preventDefault()}>
          <fieldset>
            <legend>Version to run</legend>
            <label><input type="radio" name="version" checked={version === "latest"} onChange={() => setVersion("latest")} /> latest</label>
            <label><input type="radio" name="version" checked={version === "pinned"} onChange={() => setVersion("pinned")} /> the one that failed{letter.script_version ? ` (v${letter.script_version})` : ""}</label>
            <label><input type="radio" name="version" checked={version === "number"} onChange={() => setVersion("number")} /> version
              <input type="number" min="1" aria-label="Version number" value={number} onInput={(e) => { setVersion("number"); setNumber(e.currentTarget.value); }} />
            </label>
          </fieldset>
          <button type="button" onClick={() => replay(true)}>Dry run</button>
          <button type="button" class="primary" disabled={!outcome?.dry_run} title={outcome?.dry_run ? "" : "Dry-run first"} onClick={() => replay(false)}>Replay</button>
        </form>
      )}
      <Problem error={replayError} />
      {outcome?.dry_run && (
        <div class="outcome" aria-label="Dry run outcome">
          <p>Dry run of v{outcome.version}: <strong>{outcome.outcome}</strong></p>
          <Json label="Dry run" value={{ run: outcome.run, would: outcome.would }} />
        </div>
      )}
      <h2>Job</h2>
      <Json label="Job" value={letter.job} />
      <h2>Attempts</h2>
      <Attempts runs={found.runs} />
    </section>
  );
}
