// The overview: runs per minute by status over the last hour, p50/p99 duration, and the
// dead letters waiting.

import { api, tenantPath } from "./api.js";
import { Problem, href, useLoad } from "./ui.jsx";
import { useEffect } from "preact/hooks";

const COLORS = { ok: "#2e7d32", retrying: "#ef6c00", dead_lettered: "#c62828", failed: "#ad1457", skipped: "#757575" };

function Chart({ minutes }) {
  const width = 720;
  const height = 160;
  const slot = width / Math.max(minutes.length, 1);
  const top = Math.max(1, ...minutes.map((m) => Object.values(m.runs).reduce((a, b) => a + b, 0)));
  return (
    <svg class="chart" viewBox={`0 0 ${width} ${height + 16}`} role="img" aria-label="Runs per minute by status, last hour">
      {minutes.map((m, i) => {
        let y = height;
        return Object.entries(m.runs).map(([status, n]) => {
          const h = (n / top) * height;
          y -= h;
          return (
            <rect x={i * slot + 1} y={y} width={Math.max(slot - 2, 1)} height={h} fill={COLORS[status] || "#555"}>
              <title>{`${new Date(m.minute).toLocaleTimeString()}: ${n} ${status}`}</title>
            </rect>
          );
        });
      })}
      <text x="0" y={height + 14} font-size="11">−60 min</text>
      <text x={width - 30} y={height + 14} font-size="11">now</text>
    </svg>
  );
}

export function OverviewPage({ tenant }) {
  const [view, error, reload] = useLoad(() => api("GET", tenantPath(tenant, "overview")), [tenant]);
  useEffect(() => {
    const timer = setInterval(reload, 10000);
    return () => clearInterval(timer);
  }, [tenant]);
  return (
    <section>
      <h1>Overview</h1>
      <Problem error={error} />
      {view && (
        <>
          <dl class="tiles">
            <div><dt>Runs, last hour</dt><dd>{view.runs}</dd></div>
            <div><dt>Duration p50</dt><dd>{fmt(view.p50_ms)}</dd></div>
            <div><dt>Duration p99</dt><dd>{fmt(view.p99_ms)}</dd></div>
            <div><dt>Dead letters waiting</dt><dd><a href={href("dead-letters")}>{view.dead_letters}</a></dd></div>
          </dl>
          <Chart minutes={view.minutes} />
          <p class="legend">
            {Object.entries(COLORS).map(([s, c]) => <span><i style={{ background: c }} /> {s.replace("_", " ")}</span>)}
          </p>
        </>
      )}
    </section>
  );
}

function fmt(ms) {
  return ms == null ? "—" : ms < 1000 ? `${Math.round(ms * 10) / 10} ms` : `${(ms / 1000).toFixed(2)} s`;
}
