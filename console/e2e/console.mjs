// Drives the console's main flows in Debian's Chromium with Playwright, against a daemon
// the caller started (tests/console.rs): sign in, watch a run appear and open it, read a
// dead letter, see a validation error at its line, deploy a fix from the editor, dry-run and
// replay the dead letter, and see the overview. Saves a screenshot of each step.
//
//   CONSOLE_URL=http://127.0.0.1:8787/console/ CONSOLE_TOKEN=sd_... CONSOLE_TENANT=acme \
//   CONSOLE_SHOTS=target/console-screenshots node e2e/console.mjs
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const url = need("CONSOLE_URL");
const token = need("CONSOLE_TOKEN");
const tenant = need("CONSOLE_TENANT");
const shots = process.env.CONSOLE_SHOTS || "console-screenshots";
const WAIT = 30_000;
mkdirSync(shots, { recursive: true });

function need(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

function step(what) {
  console.log(`console e2e: ${what}`);
}

/** Publishes an event through the API, as a service would. */
async function publish(type, data) {
  const answer = await fetch(new URL(`/v1/tenants/${tenant}/events`, url), {
    method: "POST",
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
    body: JSON.stringify({ type, data }),
  });
  if (!answer.ok) throw new Error(`publishing ${type}: ${answer.status} ${await answer.text()}`);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
const page = await browser.newPage({ viewport: { width: 1366, height: 800 } });
const external = [];
page.on("request", (r) => {
  if (!r.url().startsWith(new URL(url).origin)) external.push(r.url());
});
const shot = async (name) => {
  await page.screenshot({ path: join(shots, `${name}.png`), fullPage: true });
  // Every page shown is checked for form controls without a label.
  const unlabeled = await page.evaluate(() =>
    [...document.querySelectorAll("input, select, textarea")]
      .filter((e) => !e.labels?.length && !e.getAttribute("aria-label"))
      .map((e) => e.outerHTML.slice(0, 80)),
  );
  if (unlabeled.length) throw new Error(`controls without a label on ${name}: ${unlabeled.join(", ")}`);
};
try {
  step("sign in with a tenant token (a wrong one is refused)");
  await page.goto(url);
  await page.getByLabel("API token").fill("sd_wrong_token");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("alert").waitFor({ timeout: WAIT });
  await shot("signin-refused");
  await page.getByLabel("API token").fill(token);
  await page.keyboard.press("Enter");
  await page.getByRole("navigation", { name: "Pages" }).waitFor({ timeout: WAIT });

  step("watch a run appear (reaching the runs page with the keyboard)");
  await page.getByRole("link", { name: "Overview" }).focus();
  await page.keyboard.press("Tab");
  const focused = await page.evaluate(() => document.activeElement?.textContent);
  if (focused !== "Runs") throw new Error(`Tab after Overview reached ${focused}, not Runs`);
  await page.keyboard.press("Enter");
  await page.getByRole("heading", { name: "Runs" }).waitFor();
  await publish("greet.hello", { name: "Ada" });
  const greetRow = page.locator("tr", { hasText: "greet" }).filter({ hasText: "ok" });
  await greetRow.first().waitFor({ timeout: WAIT });
  await shot("runs");

  step("open it");
  await greetRow.first().getByRole("link").click();
  await page.getByRole("heading", { name: /Run #\d+/ }).waitFor({ timeout: WAIT });
  const result = await page.getByLabel("Result").textContent();
  if (!result.includes('"hello": "Ada"')) throw new Error(`the run's result is not shown: ${result}`);
  const input = await page.getByLabel("Input").textContent();
  if (!input.includes('"name": "Ada"')) throw new Error(`the run's event is not shown: ${input}`);
  await shot("run");

  step("read a dead letter");
  await publish("order.created", { order: "A-1" });
  await page.getByRole("link", { name: "Dead letters" }).click();
  const letter = page.locator("tr", { hasText: "charge" });
  const deadline = Date.now() + WAIT;
  while (!(await letter.count())) {
    if (Date.now() > deadline) throw new Error("the dead letter never appeared");
    await page.getByRole("button", { name: "Refresh" }).click();
    await page.waitForTimeout(500);
  }
  await letter.first().getByRole("link").click();
  await page.getByText("card declined for A-1").first().waitFor({ timeout: WAIT });
  const letterPage = page.url();
  await shot("dead-letter");

  step("see a validation error at its line");
  await page.getByRole("link", { name: "charge" }).first().click();
  await page.getByRole("link", { name: "Edit" }).click();
  const source = page.getByLabel("Source");
  await source.waitFor({ timeout: WAIT });
  await source.fill("export default (e) => {\n  return { charged: e.data.order ;\n};\n");
  await page.getByRole("button", { name: "Validate" }).click();
  const invalid = page.locator(".validation");
  await invalid.waitFor({ timeout: WAIT });
  const said = await invalid.textContent();
  if (!/^Line 2, column \d+: syntax/.test(said)) throw new Error(`the error is not at line 2: ${said}`);
  if ((await page.locator(".gutter li.bad").textContent()) !== "2") throw new Error("line 2 is not marked");
  await shot("validation");

  step("deploy the fix from the editor");
  await source.fill("export default (e) => ({ charged: e.data.order });\n");
  await page.getByRole("button", { name: "Validate" }).click();
  await page.getByText("Valid: it compiles and loads.").waitFor({ timeout: WAIT });
  await page.getByRole("button", { name: "Test run" }).click();
  const trial = page.getByLabel("Test run", { exact: true });
  await trial.waitFor({ timeout: WAIT });
  if (!(await trial.textContent()).includes('"status": "ok"')) throw new Error("the test run did not succeed");
  await page.getByRole("button", { name: "Deploy" }).click();
  await page.getByText(/Deployed charge v2/).waitFor({ timeout: WAIT });
  await shot("deployed");

  step("dry-run, then replay the dead letter");
  await page.goto(letterPage);
  await page.getByRole("button", { name: "Dry run" }).click();
  const outcome = page.getByLabel("Dry run outcome");
  await outcome.waitFor({ timeout: WAIT });
  const dry = await outcome.textContent();
  if (!dry.includes("v2") || !dry.includes('"charged": "A-1"')) throw new Error(`dry run: ${dry}`);
  await shot("dry-run");
  await page.getByRole("button", { name: "Replay", exact: true }).click();
  await page.getByText(/Replayed as job/).waitFor({ timeout: WAIT });

  step("the replay runs the fix");
  await page.getByRole("link", { name: "Runs", exact: true }).click();
  await page
    .locator("tr", { hasText: "charge v2" })
    .filter({ hasText: "replay" })
    .filter({ hasText: "ok" })
    .first()
    .waitFor({ timeout: WAIT });
  await shot("replayed");

  step("the overview");
  await page.getByRole("link", { name: "Overview" }).click();
  await page.getByRole("img", { name: /Runs per minute/ }).waitFor({ timeout: WAIT });
  await shot("overview");

  step("versions side by side");
  await page.getByRole("link", { name: "Scripts" }).click();
  await page.getByRole("link", { name: "charge" }).click();
  await page.getByLabel("From").selectOption("1");
  await page.getByLabel("To").selectOption("2");
  await page.getByRole("button", { name: "Compare" }).click();
  await page.getByLabel("Diff").waitFor({ timeout: WAIT });
  await shot("diff");

  if (external.length) throw new Error(`requests left the machine: ${external.join(", ")}`);
  step("done");
} catch (e) {
  await shot("failure").catch(() => {});
  console.error(`console e2e failed at ${page.url()}: ${e.stack || e}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
