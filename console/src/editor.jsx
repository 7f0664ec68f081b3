// The script editor: change the source (or write a new script), validate it with errors shown
// at their line, test-run it on a sample event, and deploy it.

import { useEffect, useRef, useState } from "preact/hooks";
import { api, tenantPath } from "./api.js";
import { Json, Problem, href, useLoad } from "./ui.jsx";

const STARTER = `export default async function (event, ctx) {
  ctx.log("got", event.type);
  return { ok: true };
}
`;

/** Where a validation failure points: the line (1-based) and column, when it says. */
function place(check) {
  if (check.line) return { line: check.line, column: check.column };
  const at = /:(\d+):(\d+)\)?\s*$/m.exec(check.stack || "");
  return at ? { line: Number(at[1]), column: Number(at[2]) } : null;
}

function Source({ value, setValue, badLine, textarea }) {
  const lines = value.split("\n").length;
  const gutter = useRef(null);
  const scrolled = (e) => {
    if (gutter.current) gutter.current.scrollTop = e.currentTarget.scrollTop;
  };
  return (
    <div class="editor">
      <ol class="gutter" ref={gutter} aria-hidden="true">
        {Array.from({ length: lines }, (_, i) => (
          <li class={i + 1 === badLine ? "bad" : ""}>{i + 1}</li>
        ))}
      </ol>
      <textarea
        ref={textarea}
        id="source"
        aria-label="Source"
        spellcheck={false}
        value={value}
        onInput={(e) => setValue(e.currentTarget.value)}
        onScroll={scrolled}
        onKeyDown={(e) => {
          // Tab indents; Escape then Tab leaves the editor, as keyboard users expect.
          if (e.key === "Tab" && !e.shiftKey && !e.currentTarget.dataset.escaped) {
            e.preventDefault();
            const t = e.currentTarget;
            const [a, b] = [t.selectionStart, t.selectionEnd];
            setValue(t.value.slice(0, a) + "  " + t.value.slice(b));
            requestAnimationFrame(() => t.setSelectionRange(a + 2, a + 2));
          }
          e.currentTarget.dataset.escaped = e.key === "Escape" ? "1" : "";
        }}
      />
    </div>
  );
}

export function EditorPage({ tenant, name }) {
  const creating = name === "new";
  const [script, loadError] = useLoad(
    () => (creating ? Promise.resolve(null) : api("GET", tenantPath(tenant, "scripts", name) + "?source=true")),
    [tenant, name],
  );
  const [form, setForm] = useState(null);
  const [check, setCheck] = useState(null);
  const [test, setTest] = useState(null);
  const [deployed, setDeployed] = useState(null);
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState("");
  const textarea = useRef(null);
  useEffect(() => {
    if (creating) {
      setForm({ name: "", source: STARTER, lang: "js", on: "", cron: "", timezone: "UTC", sample: '{"hello": "world"}', sampleType: "test" });
    } else if (script) {
      setForm({
        name: script.name,
        source: script.typescript ?? script.source,
        lang: script.language === "typescript" ? "ts" : "js",
        on: (script.subjects || []).join(", "),
        cron: script.cron || "",
        timezone: script.timezone || "UTC",
        sample: "{}",
        sampleType: (script.subjects || []).find((s) => !/[*>]/.test(s)) || "test",
      });
    }
  }, [script, creating]);
  if (loadError) return <Problem error={loadError} />;
  if (!form) return <p>Loading…</p>;
  const set = (key) => (e) => setForm({ ...form, [key]: e.currentTarget.value });
  const target = creating ? form.name.trim() : name;
  const run = async (what, work) => {
    setBusy(what);
    setError(null);
    try {
      await work();
    } catch (e) {
      setError(e);
    } finally {
      setBusy("");
    }
  };
  const validate = () =>
    run("validate", async () => {
      const answer = await api("POST", tenantPath(tenant, "validate"), { source: form.source, lang: form.lang });
      setCheck(answer);
      const at = place(answer);
      if (at && textarea.current) {
        const offset = form.source.split("\n").slice(0, at.line - 1).join("\n").length + (at.line > 1 ? 1 : 0);
        textarea.current.focus();
        textarea.current.setSelectionRange(offset, offset);
      }
    });
  const testRun = () =>
    run("test", async () => {
      let data;
      try {
        data = JSON.parse(form.sample || "null");
      } catch (e) {
        throw new Error(`the sample event is not JSON: ${e.message}`);
      }
      setTest(await api("POST", tenantPath(tenant, "scripts", target || "draft", "test"), { data, type: form.sampleType.trim() || "test", source: form.source, lang: form.lang }));
    });
  const deploy = () =>
    run("deploy", async () => {
      if (!target) throw new Error("the script needs a name");
      const kept = script
        ? { overlap: script.overlap, catch_up: script.catch_up, limits: script.limits, retry: script.retry, http: script.http ?? null }
        : {};
      const body = {
        ...kept,
        source: form.source,
        lang: form.lang,
        on: form.on.split(",").map((s) => s.trim()).filter(Boolean),
        cron: form.cron.trim() || null,
        timezone: form.timezone.trim() || "UTC",
      };
      setDeployed(await api("PUT", tenantPath(tenant, "scripts", target), body));
    });
  const at = check && !check.ok ? place(check) : null;
  return (
    <section>
      <h1>{creating ? "New script" : `Edit ${name}`}</h1>
      <form class="edit" onSubmit={(e) => e.preventDefault()}>
        <div class="settings">
          {creating && <label>Name <input name="name" required value={form.name} onInput={set("name")} /></label>}
          <label>Language
            <select name="lang" value={form.lang} onChange={set("lang")}>
              <option value="js">JavaScript</option>
              <option value="ts">TypeScript</option>
            </select>
          </label>
          <label>Subjects <input name="on" value={form.on} onInput={set("on")} placeholder="order.*, invoice.paid" /></label>
          <label>Cron <input name="cron" value={form.cron} onInput={set("cron")} placeholder="0 */5 * * * *" /></label>
          <label>Time zone <input name="timezone" value={form.timezone} onInput={set("timezone")} /></label>
        </div>
        <Source value={form.source} setValue={(source) => { setForm({ ...form, source }); setCheck(null); }} badLine={at?.line} textarea={textarea} />
        {check && (check.ok ? (
          <p role="status" class="ok">Valid: it compiles and loads.</p>
        ) : (
          <p role="alert" class="problem validation">
            {at ? `Line ${at.line}, column ${at.column}: ` : ""}{check.kind}: {check.message}
          </p>
        ))}
        <p class="actions">
          <button type="button" onClick={validate} disabled={!!busy}>Validate</button>
          <button type="button" onClick={testRun} disabled={!!busy}>Test run</button>
          <button type="button" class="primary" onClick={deploy} disabled={!!busy}>Deploy</button>
          {busy && <span aria-live="polite"> {busy}…</span>}
        </p>
        <div class="settings">
          <label>Sample event type <input name="sampleType" value={form.sampleType} onInput={set("sampleType")} /></label>
          <label class="sample">Sample event data (JSON)
            <textarea name="sample" rows="4" cols="60" value={form.sample} onInput={set("sample")} />
          </label>
        </div>
      </form>
      <Problem error={error} />
      {deployed && (
        <p role="status" class="ok">
          Deployed <a href={href("scripts", tenant, deployed.name)}>{deployed.name}</a> v{deployed.version}
          {deployed.unchanged ? " (source unchanged)" : ""}{deployed.live ? ", running here now" : ""}.
        </p>
      )}
      {test && (
        <div aria-label="Test run outcome">
          <h2>Test run</h2>
          <Json label="Test run" value={test} />
        </div>
      )}
    </section>
  );
}
