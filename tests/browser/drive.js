// Headless Chromium for tests/browser.rs: opens the watch page at URL and acts as the
// person in front of it. The test keeps the timing and the assertions; this only answers
// one line of JSON per command line read on stdin:
//   state            -> {"paused":..,"time":..,"rate":..,"ready":..,"at":..}, `at` being
//                       when `time` was read (ms since the epoch, the machine's clock)
//   pause | play     -> the state once the page has been told
//   screenshot PATH  -> {"saved":PATH}
//   quit             -> closes the browser and exits
// Usage: node drive.js URL USER_DATA_DIR
"use strict";
const readline = require("readline");
const { chromium } = require("playwright-core");

const [url, dataDir] = process.argv.slice(2);
if (!url || !dataDir) {
  console.error("usage: node drive.js URL USER_DATA_DIR");
  process.exit(2);
}

const STATE = `(() => { const v = document.getElementById("v");
  return { paused: v.paused, time: v.currentTime, rate: v.playbackRate, ready: v.readyState,
           at: Date.now() }; })()`;

async function main() {
  const context = await chromium.launchPersistentContext(dataDir, {
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
      "--autoplay-policy=no-user-gesture-required",
    ],
    viewport: { width: 800, height: 700 },
  });
  const page = context.pages()[0] || (await context.newPage());
  page.on("console", m => console.error(`page: ${m.text()}`));
  page.on("pageerror", e => console.error(`page error: ${e.message}`));
  const resp = await page.goto(url);
  console.error(`page: ${resp ? resp.status() : "no response"}`);
  await page.waitForSelector("#v");
  const out = v => process.stdout.write(JSON.stringify(v) + "\n");
  out({ ready: true });

  const rl = readline.createInterface({ input: process.stdin });
  for await (const line of rl) {
    const [cmd, ...rest] = line.trim().split(" ");
    try {
      if (cmd === "state") {
        out(await page.evaluate(STATE));
      } else if (cmd === "pause") {
        out(await page.evaluate(`document.getElementById("v").pause(); ${STATE}`));
      } else if (cmd === "play") {
        out(await page.evaluate(`document.getElementById("v").play().catch(() => {}); ${STATE}`));
      } else if (cmd === "screenshot") {
        await page.screenshot({ path: rest.join(" ") });
        out({ saved: rest.join(" ") });
      } else if (cmd === "quit") {
        break;
      } else {
        out({ error: `unknown command ${cmd}` });
      }
    } catch (e) {
      out({ error: String(e) });
    }
  }
  await context.close();
}

main().then(
  () => process.exit(0),
  e => { console.error(String(e && e.stack || e)); process.exit(1); },
);
