// Builds the console into dist/ (index.html, app.js, app.css), which the scriptd binary
// embeds. `--check` builds into a temporary directory and fails if dist/ differs: CI uses it
// to prove the committed assets are what these sources make.
import { build } from "esbuild";
import { cpSync, mkdtempSync, readFileSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const check = process.argv.includes("--check");
const out = check ? mkdtempSync(join(tmpdir(), "scriptd-console-")) : "dist";
rmSync(out, { recursive: true, force: true });
await build({
  entryPoints: ["src/main.jsx"],
  bundle: true,
  minify: true,
  format: "esm",
  target: "es2020",
  jsx: "automatic",
  jsxImportSource: "preact",
  outfile: join(out, "app.js"),
  legalComments: "eof",
  logLevel: "warning",
});
cpSync("src/index.html", join(out, "index.html"));
cpSync("src/app.css", join(out, "app.css"));
if (check) {
  const stale = readdirSync(out).filter((f) => {
    try {
      return !readFileSync(join(out, f)).equals(readFileSync(join("dist", f)));
    } catch {
      return true;
    }
  });
  rmSync(out, { recursive: true, force: true });
  if (stale.length) {
    console.error(`console: dist/ is not what the sources build (${stale.join(", ")}); run npm run build in console/`);
    process.exit(1);
  }
  console.log("console: dist/ matches the sources");
}
