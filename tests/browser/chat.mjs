// End-to-end test of the web client in a real browser (Debian's chromium,
// driven by playwright-core). Started by tests/it/browser.rs, which runs NATS,
// PostgreSQL and two gateways with --dev and passes:
//   NATTER_GW1, NATTER_GW2        the gateways' base URLs
//   NATTER_BROWSER_MODULES        directory whose node_modules has playwright-core (.tools/browser)
//   NATTER_BROWSER_ARTIFACTS      where screenshots go
//   NATTER_CHROMIUM               the browser (default /usr/bin/chromium)
// Exits 0 when every step passed; prints the step that failed otherwise.

import { mkdirSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";

const env = (k, d) => process.env[k] || d || fail(`${k} is not set`);
const GW1 = env("NATTER_GW1");
const GW2 = env("NATTER_GW2");
const ART = env("NATTER_BROWSER_ARTIFACTS");
const CHROMIUM = env("NATTER_CHROMIUM", "/usr/bin/chromium");
const { chromium } = createRequire(join(env("NATTER_BROWSER_MODULES"), "package.json"))("playwright-core");

const T = 15_000; // every single wait
const started = Date.now();
const log = (...a) => console.log(`[${((Date.now() - started) / 1000).toFixed(1)}s]`, ...a);
function fail(msg) {
  throw new Error(msg);
}
// The whole run is bounded, whatever hangs.
const guard = setTimeout(() => {
  console.error("browser test: overall time limit (55 s) reached");
  process.exit(2);
}, 55_000);

mkdirSync(ART, { recursive: true });
const shot = (page, name) => page.screenshot({ path: join(ART, `${name}.png`), fullPage: true });
const id = (testid) => `[data-testid="${testid}"]`;

/** Waits until `fn(arg)` is truthy in the page; `what` names the step when it is not. */
async function until(page, what, fn, arg) {
  try {
    await page.waitForFunction(fn, arg, { timeout: T, polling: 50 });
  } catch (e) {
    fail(`${what}: not within ${T} ms (${e.message.split("\n")[0]})`);
  }
  log("ok:", what);
}

const connState = (page) => page.locator(id("conn-state")).getAttribute("data-state");
const online = (page, who) =>
  until(page, `${who} is online`, () => document.querySelector('[data-testid="conn-state"]').dataset.state === "online");
const countBodies = (page, text) =>
  page.evaluate((t) => [...document.querySelectorAll('[data-testid="message-body"]')].filter((e) => e.textContent === t).length, text);
const hasMessage = (page, who, text) =>
  until(page, `${who} sees "${text}"`, (t) =>
    [...document.querySelectorAll('[data-testid="message"]')].some((li) =>
      li.dataset.seq && li.querySelector('[data-testid="message-body"]')?.textContent === t), text);
async function say(page, text) {
  await page.locator(id("composer-input")).fill(text);
  await page.locator(id("composer-input")).press("Enter");
}

// Starting chromium took more than 15 s twice while the rest of the suite
// kept both cores busy; the Rust side bounds the whole script at 90 s.
const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
  timeout: 45_000,
});
const pages = {};
const problems = [];
let status = 0;
try {
  const ctxA = await browser.newContext({ viewport: { width: 1100, height: 700 } });
  const ctxB = await browser.newContext({ viewport: { width: 1100, height: 700 } });
  const alice = (pages.alice = await ctxA.newPage());
  const bob = (pages.bob = await ctxB.newPage());
  for (const [who, p] of Object.entries(pages)) {
    p.setDefaultTimeout(T);
    // Uncaught exceptions and CSP violations fail the run (at the end, with the rest of the story).
    p.on("pageerror", (e) => { log(`${who} page error:`, e.message); problems.push(`${who}: ${e.message}`); });
    p.on("console", (m) => {
      if (m.type() !== "error") return;
      log(`${who} console error:`, m.text());
      if (m.text().includes("Content Security Policy")) problems.push(`${who}: ${m.text()}`);
    });
  }

  // --- sign in from #as= on two gateways -----------------------------------------
  await alice.goto(`${GW1}/#as=alice`);
  await bob.goto(`${GW2}/#as=bob`);
  await online(alice, "alice");
  await online(bob, "bob");
  if ((await alice.locator(id("me")).textContent()) !== "alice") fail("alice is not signed in as alice");

  // --- alice creates a room with bob; bob gets it live (room_added) ------------------
  await alice.locator(id("new-room-name")).fill("Weekend plans");
  await alice.locator(id("new-room-members")).fill("bob");
  await alice.locator(id("create-room")).click();
  await until(alice, "alice has the room open", () =>
    document.querySelector('[data-testid="room-title"]').textContent === "Weekend plans");
  await until(bob, "bob's room list shows the new room", () =>
    [...document.querySelectorAll('[data-testid="room-item"]')].some((b) => b.textContent.includes("Weekend plans")));
  await bob.locator(id("room-item"), { hasText: "Weekend plans" }).click();
  await until(bob, "bob has the room open", () =>
    document.querySelector('[data-testid="room-title"]').textContent === "Weekend plans");

  // --- typing, message, seen ------------------------------------------------------------
  await alice.locator(id("composer-input")).pressSequentially("hello bo", { delay: 15 });
  await until(bob, "bob sees 'alice is typing…'", () =>
    document.querySelector('[data-testid="typing"]').textContent === "alice is typing…");
  await shot(bob, "1-bob-sees-typing");
  await alice.locator(id("composer-input")).pressSequentially("b");
  await alice.locator(id("composer-input")).press("Enter");
  await hasMessage(bob, "bob", "hello bob");
  await until(bob, "bob's typing line clears", () => document.querySelector('[data-testid="typing"]').textContent === "");
  await until(alice, "alice sees 'Seen by bob'", () =>
    [...document.querySelectorAll('[data-testid="seen"]')].some((e) => e.textContent === "Seen by bob"));
  await until(alice, "alice sees bob online", () =>
    document.querySelector('[data-testid="presence"][data-user="bob"]')?.dataset.status === "online");
  await shot(alice, "2-alice-sees-seen-by-bob");

  // --- unread badge: a message in a room bob is not looking at -----------------------------
  await alice.locator(id("new-room-name")).fill("Side room");
  await alice.locator(id("new-room-members")).fill("bob");
  await alice.locator(id("create-room")).click();
  await until(alice, "alice has the side room open", () =>
    document.querySelector('[data-testid="room-title"]').textContent === "Side room");
  await until(bob, "bob's list shows the side room", () =>
    document.querySelector('[data-testid="room-item"][data-room]')
    && [...document.querySelectorAll('[data-testid="room-item"]')].some((b) => b.textContent.includes("Side room")));
  await say(alice, "psst");
  await until(bob, "bob sees an unread badge of 1 on the side room", () =>
    [...document.querySelectorAll('[data-testid="room-item"]')].find((b) => b.textContent.includes("Side room"))
      ?.querySelector('[data-testid="unread-badge"]')?.firstChild?.textContent === "1");
  await shot(bob, "3-bob-unread-badge");
  await alice.locator(id("room-item"), { hasText: "Weekend plans" }).click();
  await hasMessage(alice, "alice (back in the first room)", "hello bob");

  // --- alice loses the network; bob writes meanwhile; alice resumes ---------------------------
  await alice.evaluate(() => {
    const el = document.querySelector('[data-testid="conn-state"]');
    window.__states = [el.dataset.state];
    new MutationObserver(() => window.__states.push(el.dataset.state)).observe(el, { attributes: true });
  });
  await ctxA.setOffline(true);
  await until(alice, "alice shows offline", () =>
    document.querySelector('[data-testid="conn-state"]').dataset.state === "offline");
  await say(bob, "while you were away");
  await hasMessage(bob, "bob (acked)", "while you were away");
  await shot(alice, "4-alice-offline");
  await ctxA.setOffline(false);
  await online(alice, "alice (again)");
  const states = await alice.evaluate(() => window.__states);
  log("alice's connection states:", states.join(" → "));
  const r = states.lastIndexOf("reconnecting");
  if (r < 0 || states.indexOf("offline") > r || states.at(-1) !== "online") {
    fail(`expected offline → reconnecting → online, got ${states.join(" → ")}`);
  }
  await hasMessage(alice, "alice (missed while offline)", "while you were away");
  // A message after the resume proves the replay is over; then count.
  await say(bob, "welcome back");
  await hasMessage(alice, "alice", "welcome back");
  const n = await countBodies(alice, "while you were away");
  if (n !== 1) fail(`alice shows the missed message ${n} times, expected once`);
  const seqs = await alice.evaluate(() =>
    [...document.querySelectorAll('[data-testid="message"]')].map((li) => Number(li.dataset.seq)));
  if (seqs.some((s, i) => i > 0 && s <= seqs[i - 1])) fail(`messages out of order or repeated: ${seqs}`);
  log("ok: missed message shown exactly once, seqs", seqs.join(","));
  await shot(alice, "5-alice-resumed");

  // --- away again while bob writes more than a resume replays (the gateways run --limit-replay 3) ---
  await ctxA.setOffline(true);
  await until(alice, "alice shows offline (again)", () =>
    document.querySelector('[data-testid="conn-state"]').dataset.state === "offline");
  for (let i = 1; i <= 5; i++) {
    await say(bob, `gap ${i}`);
    await hasMessage(bob, "bob (acked)", `gap ${i}`);
  }
  await ctxA.setOffline(false);
  await online(alice, "alice (after the gap)");
  await hasMessage(alice, "alice (the newest three, replayed)", "gap 5");
  await until(alice, "alice holds only what follows the cut, with a load-older button", () => {
    const bodies = [...document.querySelectorAll('[data-testid="message-body"]')].map((e) => e.textContent);
    return bodies.join("|") === "gap 3|gap 4|gap 5" && !document.querySelector('[data-testid="load-older"]').hidden;
  });
  await alice.locator(id("load-older")).click();
  await until(alice, "alice pages the gap: every message once, in order", () => {
    const bodies = [...document.querySelectorAll('[data-testid="message-body"]')].map((e) => e.textContent);
    const seqs = [...document.querySelectorAll('[data-testid="message"]')].map((li) => Number(li.dataset.seq));
    return bodies.join("|") === "hello bob|while you were away|welcome back|gap 1|gap 2|gap 3|gap 4|gap 5"
      && seqs.every((s, i) => i === 0 || s > seqs[i - 1]);
  });
  log("ok: a resume cut at 3 showed the newest three, then the gap paged in order");

  // --- bob leaves: alice sees him offline after the presence grace -----------------------------
  await ctxB.close();
  delete pages.bob;
  await until(alice, "alice sees bob offline with a last-seen time", () => {
    const li = document.querySelector('[data-testid="presence"][data-user="bob"]');
    return li?.dataset.status === "offline" && li.querySelector('[data-testid="last-seen"]')?.textContent.includes("last seen");
  });
  await shot(alice, "6-alice-sees-bob-offline");

  // --- scroll-back: 60 messages written over HTTP before alice is added -------------------------
  const api = async (method, path, body, token) => {
    const res = await fetch(`${GW2}${path}`, {
      method,
      headers: { "Content-Type": "application/json", ...(token ? { Authorization: `Bearer ${token}` } : {}) },
      body: JSON.stringify(body),
      signal: AbortSignal.timeout(T),
    });
    if (!res.ok) fail(`${method} ${path}: ${res.status} ${await res.text()}`);
    return res.json();
  };
  const { token: bobToken } = await api("POST", "/v1/dev/token", { user: "bob" });
  const hist = await api("POST", "/v1/rooms", { name: "History" }, bobToken);
  for (let i = 1; i <= 60; i++) {
    await api("POST", `/v1/rooms/${hist.id}/messages`, { id: `h${i}`, body: `old ${i}` }, bobToken);
  }
  await api("POST", `/v1/rooms/${hist.id}/members`, { user: "alice" }, bobToken);
  await alice.locator(id("room-item"), { hasText: "History" }).click();
  const shown = () => alice.locator(id("message")).count();
  // The first page is the newest 50 (more only if the room's live join already brought some).
  await until(alice, "alice sees the newest page with a load-older button", () =>
    document.querySelectorAll('[data-testid="message"]').length >= 50
    && !document.querySelector('[data-testid="load-older"]').hidden);
  const firstPage = await shown();
  log("first page:", firstPage, "messages");
  await alice.locator(id("load-older")).click();
  await until(alice, "alice sees all 60 after loading older ones, oldest first", () => {
    const bodies = [...document.querySelectorAll('[data-testid="message-body"]')].map((e) => e.textContent);
    return bodies.length === 60 && bodies[0] === "old 1" && bodies[59] === "old 60"
      && document.querySelector('[data-testid="load-older"]').hidden;
  });
  log("ok: scroll-back shows", await shown(), "messages");
  await shot(alice, "7-alice-history-scrolled-back");

  // --- the server closes alice's socket (log out everywhere → 4001): new dev token, backoff, resume ---
  await alice.evaluate(() => { window.__states = []; });
  const { token: aliceToken } = await api("POST", "/v1/dev/token", { user: "alice" });
  const revoked = await fetch(`${GW1}/v1/sessions`, {
    method: "DELETE", headers: { Authorization: `Bearer ${aliceToken}` }, signal: AbortSignal.timeout(T),
  });
  if (revoked.status !== 202) fail(`DELETE /v1/sessions: ${revoked.status}`);
  await until(alice, "alice reconnects after her socket is closed by the server", () =>
    window.__states.includes("reconnecting") && window.__states.at(-1) === "online");
  log("alice's connection states:", (await alice.evaluate(() => window.__states)).join(" → "));
  await api("POST", `/v1/rooms/${hist.id}/messages`, { id: "h61", body: "old 61" }, bobToken);
  await hasMessage(alice, "alice (after the server closed her socket)", "old 61");
  if (problems.length) fail(`errors in the pages:\n  ${problems.join("\n  ")}`);
  log(`PASS in ${((Date.now() - started) / 1000).toFixed(1)} s; screenshots in ${ART}`);
} catch (e) {
  status = 1;
  console.error(`FAIL: ${e.message}`);
  for (const [who, p] of Object.entries(pages)) {
    try {
      console.error(`${who}: connection ${await connState(p)}; screenshot failure-${who}.png`);
      await shot(p, `failure-${who}`);
    } catch { /* page gone */ }
  }
} finally {
  await browser.close().catch(() => {});
  clearTimeout(guard);
}
process.exit(status);
