// Drives both Breakwater dashboards in headless Chromium and asserts what a user sees.
//
//   node tests/browser/dashboards.mjs <gateway-url> <registry-url> <screenshot-dir>
//
// Run by tests/e2e/dashboards_in_a_browser.rs, which owns the system. The one step it
// cannot do from here (stopping an instance) is a handshake on stdio: this script prints
// `READY_FOR_STOP`, the Rust side stops the instance and answers `<service> <port>`.
// Exit code 0 only if every assertion held.

import { chromium } from "playwright-core";
import { mkdtempSync, rmSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";

const [gatewayUrl, registryUrl, shotDir] = process.argv.slice(2);
if (!gatewayUrl || !registryUrl || !shotDir) {
  console.error("usage: node dashboards.mjs <gateway-url> <registry-url> <screenshot-dir>");
  process.exit(64);
}
mkdirSync(shotDir, { recursive: true });

const lines = createInterface({ input: process.stdin });
const nextLine = () => new Promise((resolve, reject) => {
  lines.once("line", resolve);
  lines.once("close", () => reject(new Error("stdin closed before the instance was stopped")));
});

function step(text) { console.log(`step: ${text}`); }
function assert(cond, text) { if (!cond) throw new Error(`assertion failed: ${text}`); }
const sleep = ms => new Promise(r => setTimeout(r, ms));

// These flags matter on this machine (no GPU, no network beyond loopback, no sandbox).
const userDataDir = mkdtempSync(join(tmpdir(), "breakwater-chromium-"));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1440, height: 900 },
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
let page;
let code = 0;
try {
  page = context.pages()[0] || await context.newPage();
  page.on("pageerror", err => { console.error(`page error: ${err.message}`); code = 1; });

  step("gateway dashboard: every section loads data");
  await page.goto(gatewayUrl, { waitUntil: "domcontentloaded" });
  for (const id of ["users", "orders", "users-with-orders", "health", "processes", "services", "traffic"]) {
    await page.waitForSelector(`#${id} [data-status] .badge.ok`, { timeout: 15000 });
  }
  assert(await page.locator("#users tbody tr").count() >= 1, "users listed");
  assert(await page.locator("#orders tbody tr").count() >= 1, "orders of user 1 listed");
  assert(await page.locator("#users-with-orders .user").count() >= 1, "users with orders listed");
  assert(await page.locator("#health dl").count() === 1, "health shown");
  assert(await page.locator("#services .service").count() >= 1, "services listed");
  assert(await page.locator("#services tr[data-instance]").count() >= 1, "instances listed");
  assert(await page.locator('#processes tr[data-process][data-state="running"]').count() >= 5,
    "supervised processes listed as running");
  await page.waitForFunction(() => /failure \d/.test(document.getElementById("chaos-status").textContent),
    null, { timeout: 10000 });
  assert(await page.isVisible("#chaos-apply"), "the unstable control is offered");
  const registryHref = await page.getAttribute("#registry-link", "href");
  assert(registryHref && registryHref.length > 0, "registry dashboard link present");

  step("section test buttons refetch");
  const refetched = page.waitForResponse(r => new URL(r.url()).pathname === "/health", { timeout: 5000 });
  await page.click('#health [data-test="health"]');
  await refetched;

  step("auto-refresh starts after 5 s");
  await page.waitForFunction(() => document.getElementById("auto-refresh").textContent.includes("on"),
    null, { timeout: 8000 });

  // Counts the requests the page makes for /users in a window: the polling rate.
  async function usersPollsIn(ms) {
    let n = 0;
    const onRequest = r => { if (new URL(r.url()).pathname === "/users") n += 1; };
    page.on("request", onRequest);
    await sleep(ms);
    page.off("request", onRequest);
    return n;
  }
  async function setSlider(value) {
    await page.$eval("#refresh-slider", (el, v) => {
      el.value = String(v);
      el.dispatchEvent(new Event("input", { bubbles: true }));
    }, value);
  }
  step("slider at 1 s: the page polls about every second");
  await setSlider(1);
  assert(await page.textContent("#refresh-rate") === "1", "rate label says 1");
  assert(await page.getAttribute("#auto-refresh", "data-interval-ms") === "1000", "interval is 1000 ms");
  const fast = await usersPollsIn(4500);
  assert(fast >= 3, `at 1 s, /users was polled ${fast} times in 4.5 s`);
  step("slider at 10 s: the page polls at most once in 4.5 s, the countdown shows it");
  await setSlider(10);
  assert(await page.getAttribute("#auto-refresh", "data-interval-ms") === "10000", "interval is 10000 ms");
  await sleep(600);
  const countdown = Number((await page.textContent("#next-refresh")).match(/\d+/)?.[0]);
  assert(countdown >= 8 && countdown <= 10, `countdown shows ${countdown} s`);
  const slow = await usersPollsIn(4500);
  assert(slow <= 1, `at 10 s, /users was polled ${slow} times in 4.5 s`);
  await setSlider(2);

  step("a stopped instance shows as down or ejected, and its breaker state shows");
  console.log("READY_FOR_STOP");
  const [service, port] = (await nextLine()).trim().split(/\s+/);
  assert(service && port, "the Rust side named the stopped instance");
  const seen = await page.waitForFunction(([service, port]) => {
    const card = document.getElementById(`service-${service}`);
    const row = card && [...card.querySelectorAll("tr[data-instance]")]
      .find(r => r.dataset.instance.endsWith(`-${port}`) || r.textContent.includes(`:${port}`));
    const breaker = document.getElementById(`breaker-${service}`);
    const state = row && row.dataset.state;
    const breakerState = breaker && breaker.dataset.breakerState;
    return ["down", "ejected", "probing"].includes(state)
      && ["CLOSED", "OPEN", "HALF_OPEN"].includes(breakerState)
      ? { state, breakerState } : null;
  }, [service, port], { timeout: 45000, polling: 250 });
  const shown = await seen.jsonValue();
  console.log(`step: instance :${port} of ${service} shows ${shown.state}, breaker ${shown.breakerState}`);

  step("Stop on another users instance: shown as stopped, then down with its breaker state");
  const target = await page.$$eval("#processes tr[data-process]", (rows, hung) => {
    const row = rows.find(r => r.dataset.service === "user-service" && r.dataset.state === "running"
      && r.dataset.port !== hung);
    return row ? { name: row.dataset.process, port: row.dataset.port } : null;
  }, port);
  assert(target, "a running users instance besides the hung one");
  await page.click(`#processes tr[data-process="${target.name}"] [data-action="stop"]`);
  await page.waitForSelector(`#processes tr[data-process="${target.name}"][data-state="stopped"]`,
    { timeout: 30000 });
  assert(await page.isEnabled(`#processes tr[data-process="${target.name}"] [data-action="start"]`),
    "a stopped process can be started");
  assert(await page.isDisabled(`#processes tr[data-process="${target.name}"] [data-action="kill"]`),
    "a stopped process cannot be killed");
  const down = await page.waitForFunction(([service, port]) => {
    const card = document.getElementById(`service-${service}`);
    const row = card && [...card.querySelectorAll("tr[data-instance]")]
      .find(r => r.dataset.instance.endsWith(`-${port}`) || r.textContent.includes(`:${port}`));
    const breaker = document.getElementById(`breaker-${service}`);
    return row && row.dataset.state === "down" && breaker
      && ["CLOSED", "OPEN", "HALF_OPEN"].includes(breaker.dataset.breakerState)
      ? breaker.dataset.breakerState : null;
  }, [service, target.port], { timeout: 45000, polling: 250 });
  console.log(`step: ${target.name} (:${target.port}) shows down, breaker ${await down.jsonValue()}`);

  step("unstable's rates: applied, and a bad one refused with unstable's message");
  const original = await page.inputValue("#chaos-failure");
  await page.fill("#chaos-failure", "0.5");
  await page.click("#chaos-apply");
  await page.waitForFunction(() => /failure 0\.5/.test(document.getElementById("chaos-status").textContent),
    null, { timeout: 10000 });
  await page.fill("#chaos-failure", "2");
  await page.click("#chaos-apply");
  await page.waitForSelector("#chaos-status .error", { timeout: 10000 });
  assert((await page.textContent("#chaos-status")).includes("failureRate"), "unstable's validation shown");
  await page.fill("#chaos-failure", original);
  await page.click("#chaos-apply");
  await page.waitForFunction(() => /failure \d/.test(document.getElementById("chaos-status").textContent),
    null, { timeout: 10000 });

  // A few more seconds of chart history before the picture.
  await sleep(4000);
  await page.screenshot({ path: join(shotDir, "gateway-dashboard.png"), fullPage: true });

  step("off loopback: a 401 from /admin asks for the token, kept for the tab, sent as a header");
  {
    // This gateway listens on loopback, where /admin is open; the guard of a public one
    // is played here instead: /admin answers 401 unless the request carries the token.
    const TOKEN = "browser-test-token";
    const adminCalls = [];
    const locked = await context.newPage();
    locked.on("pageerror", err => { console.error(`page error: ${err.message}`); code = 1; });
    await locked.route(u => u.pathname.startsWith("/admin/"), route => {
      const req = route.request();
      const auth = req.headers()["authorization"] || "";
      const url = new URL(req.url());
      adminCalls.push({ path: url.pathname, url: req.url(), auth });
      if (auth === `Bearer ${TOKEN}`) return route.continue();
      return route.fulfill({ status: 401, contentType: "application/json",
        headers: { "www-authenticate": "Bearer", "x-breakwater-error": "unauthorized" },
        body: JSON.stringify({ error: "Admin API needs Authorization: Bearer <token>" }) });
    });
    await locked.goto(gatewayUrl, { waitUntil: "domcontentloaded" });
    for (const id of ["services", "traffic", "processes", "events"]) {
      await locked.waitForSelector(`#${id} [data-token-form] input[type="password"]`, { timeout: 15000 });
    }
    await locked.waitForSelector("#users [data-status] .badge.ok", { timeout: 15000 });
    assert(await locked.locator("#users [data-token-form]").count() === 0, "non-admin sections ask nothing");
    await locked.fill("#services [data-token-form] input", TOKEN);
    await locked.click('#services [data-token-form] button[type="submit"]');
    for (const id of ["services", "traffic", "processes"]) {
      await locked.waitForSelector(`#${id} [data-status] .badge.ok`, { timeout: 15000 });
    }
    await locked.waitForFunction(() => document.getElementById("events-status").textContent === "live",
      null, { timeout: 15000 });
    assert(await locked.locator("[data-token-form]").count() === 0, "token inputs gone once the token works");
    const [kept, persistent, href] = await locked.evaluate(() =>
      [sessionStorage.getItem("breakwater-admin-token"), localStorage.length, location.href]);
    assert(kept === TOKEN, "token kept in sessionStorage");
    assert(persistent === 0, "nothing in localStorage");
    assert(!href.includes(TOKEN), "token not in the page's URL");
    assert(adminCalls.every(c => !c.url.includes(TOKEN)), "token never in an /admin URL");
    assert(adminCalls.some(c => c.path === "/admin/events" && c.auth === `Bearer ${TOKEN}`),
      "the event stream sent the token");
    await locked.close();
  }

  step("registry dashboard lists services and instances");
  await page.goto(registryUrl, { waitUntil: "domcontentloaded" });
  await page.waitForSelector("#services-body [data-service] tr[data-instance] [data-remove]", { timeout: 10000 });
  assert(Number(await page.textContent("#count-services")) >= 3, "services counted");
  assert(Number(await page.textContent("#count-instances")) >= 3, "instances counted");
  assert(/\d/.test(await page.textContent("#uptime")), "uptime shown");
  const age = await page.textContent("#services-body td[data-heartbeat]");
  assert(/ago$/.test(age.trim()), `heartbeat age counts (${age})`);

  step("register by hand, then remove");
  await page.fill('#register-form [name="name"]', "browser-test");
  await page.fill('#register-form [name="port"]', "4999");
  await page.fill('#register-form [name="host"]', "127.0.0.1");
  await page.fill('#register-form [name="metadata"]', '{"note":"<b>added by the browser test</b>"}');
  await page.click("#register-submit");
  const row = '#services-body tr[data-instance="browser-test-127.0.0.1-4999"]';
  await page.waitForSelector(row, { timeout: 10000 });
  assert((await page.textContent(`${row} code`)).includes("<b>"), "metadata shown as text, not HTML");
  assert(await page.locator("#services-body b").count() === 0, "no markup injected");
  await page.click(`${row} [data-remove]`);
  await page.waitForSelector(row, { state: "detached", timeout: 10000 });

  await page.screenshot({ path: join(shotDir, "registry-dashboard.png"), fullPage: true });
  console.log(code === 0 ? "OK" : "FAILED (page errors)");
} catch (err) {
  code = 1;
  console.error(String(err && err.stack || err));
  if (page) await page.screenshot({ path: join(shotDir, "failure.png"), fullPage: true }).catch(() => {});
} finally {
  lines.close();
  await context.close();
  rmSync(userDataDir, { recursive: true, force: true });
}
process.exit(code);
