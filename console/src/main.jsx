// The console: sign in with a token, pick a tenant (operators), and the pages.

import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { api, saveToken, savedToken } from "./api.js";
import { DeadLetterPage, DeadLettersPage } from "./dead-letters.jsx";
import { EditorPage } from "./editor.jsx";
import { OverviewPage } from "./overview.jsx";
import { RunPage, RunsPage } from "./runs.jsx";
import { ScriptPage, ScriptsPage } from "./scripts.jsx";
import { Problem, href, useHash } from "./ui.jsx";

function SignIn({ signedIn }) {
  const [token, setToken] = useState("");
  const [error, setError] = useState(null);
  const submit = async (e) => {
    e.preventDefault();
    setError(null);
    try {
      const who = await api("GET", "/v1/token", undefined, token.trim());
      saveToken(token.trim());
      signedIn(who);
    } catch (err) {
      setError(err);
    }
  };
  return (
    <main class="signin">
      <h1>scriptd</h1>
      <form onSubmit={submit}>
        <label for="token">API token</label>
        <input id="token" name="token" type="password" autocomplete="off" value={token} onInput={(e) => setToken(e.currentTarget.value)} required />
        <p class="hint">A token from <code>scriptd tokens create</code>; it stays in this tab only.</p>
        <button type="submit" class="primary">Sign in</button>
      </form>
      <Problem error={error} />
    </main>
  );
}

const PAGES = [
  ["overview", "Overview"],
  ["runs", "Runs"],
  ["dead-letters", "Dead letters"],
  ["scripts", "Scripts"],
];

function Page({ parts, tenant }) {
  const [page = "overview", a, b, c] = parts;
  // Pages of one item carry their tenant, so links work whichever tenant is picked.
  if (page === "runs" && a && b) return <RunPage tenant={a} id={b} />;
  if (page === "dead-letters" && a && b) return <DeadLetterPage tenant={a} sequence={b} />;
  if (page === "scripts" && a && b && c === "edit") return <EditorPage tenant={a} name={b} />;
  if (page === "scripts" && a && b) return <ScriptPage tenant={a} name={b} />;
  if (page === "runs") return <RunsPage tenant={tenant} />;
  if (tenant === "*") return <p class="hint">Pick a tenant to see its {page.replace("-", " ")}.</p>;
  if (page === "dead-letters") return <DeadLettersPage tenant={tenant} />;
  if (page === "scripts") return <ScriptsPage tenant={tenant} />;
  return <OverviewPage tenant={tenant} />;
}

function App() {
  const [who, setWho] = useState(null);
  const [checking, setChecking] = useState(!!savedToken());
  const [tenants, setTenants] = useState([]);
  const [tenant, setTenant] = useState(sessionStorage.getItem("scriptd.tenant") || "");
  const parts = useHash();
  useEffect(() => {
    if (!savedToken()) return;
    api("GET", "/v1/token").then(setWho, () => saveToken(null)).finally(() => setChecking(false));
  }, []);
  useEffect(() => {
    if (!who) return;
    if (who.role !== "operator") {
      setTenant(who.tenant);
      return;
    }
    api("GET", "/v1/tenants").then((list) => {
      setTenants(list.tenants);
      if (!tenant || (tenant !== "*" && !list.tenants.includes(tenant))) setTenant(list.tenants[0] || "*");
    }, () => setTenants([]));
  }, [who]);
  useEffect(() => sessionStorage.setItem("scriptd.tenant", tenant), [tenant]);
  if (checking) return <p>Loading…</p>;
  if (!who) return <SignIn signedIn={setWho} />;
  const current = parts[0] || "overview";
  const signOut = () => {
    saveToken(null);
    setWho(null);
  };
  return (
    <>
      <header>
        <a class="brand" href={href("overview")}>scriptd</a>
        <nav aria-label="Pages">
          {PAGES.map(([page, label]) => (
            <a href={href(page)} aria-current={current === page ? "page" : undefined}>{label}</a>
          ))}
        </nav>
        {who.role === "operator" ? (
          <label class="tenant">Tenant
            <select value={tenant} onChange={(e) => setTenant(e.currentTarget.value)} name="tenant">
              <option value="*">all tenants (runs)</option>
              {tenants.map((t) => <option value={t}>{t}</option>)}
            </select>
          </label>
        ) : (
          <span class="tenant">Tenant {who.tenant}</span>
        )}
        <span class="who">{who.role} token {who.prefix}…</span>
        <button type="button" onClick={signOut}>Sign out</button>
      </header>
      <main>{tenant ? <Page parts={parts} tenant={tenant} /> : <p>Loading…</p>}</main>
    </>
  );
}

render(<App />, document.getElementById("app"));
