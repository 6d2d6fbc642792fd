// Time to first render of the VM list with 1,000 VMs (a `flotilla server` without nodes, so
// the VMs stay Pending and nothing but the UI is measured), in Debian's Chromium; and the
// size of what a browser downloads. Prints one JSON line.

import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import { browser, call, startFlotilla, stopFlotilla, REPO } from "../tests/harness.mjs";

const COUNT = Number(process.env.VMS ?? 1000);
const ROUNDS = Number(process.env.ROUNDS ?? 7);

const flotilla = await startFlotilla({ agent: false });
try {
  await call(flotilla, "POST", "/apis/flotilla.dev/v1alpha1/projects", { metadata: { name: "bench" } });
  const path = "/apis/flotilla.dev/v1alpha1/namespaces/bench/virtualmachines";
  let next = 0;
  await Promise.all(
    Array.from({ length: 16 }, async () => {
      while (next < COUNT) {
        const i = next++;
        await call(flotilla, "POST", path, {
          metadata: { name: `vm-${String(i).padStart(4, "0")}`, labels: { tier: i % 2 ? "web" : "db" } },
          spec: { powerState: "Running", resources: { cpus: 1 + (i % 4), memory: "1Gi" }, image: "debian-12" },
        });
      }
    }),
  );
  const chromium = await browser();
  const times = [];
  for (let round = 0; round < ROUNDS; round++) {
    const context = await chromium.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 800 } });
    await context.addInitScript((token) => sessionStorage.setItem("flotilla.token", token), flotilla.token);
    const page = await context.newPage();
    await page.goto(`${flotilla.url}/ui/p/bench/virtualmachines`);
    await page.locator("tbody tr").nth(COUNT - 1).waitFor({ timeout: 60_000 });
    // From the start of navigation to all rows in the DOM and painted once.
    const ms = await page.evaluate(() => new Promise((ok) => requestAnimationFrame(() => ok(performance.now()))));
    times.push(ms);
    await context.close();
  }
  await chromium.close();
  times.sort((a, b) => a - b);
  const assets = join(REPO, "ui/dist/assets");
  const files = readdirSync(assets).map((f) => {
    const bytes = readFileSync(join(assets, f));
    return { file: f, bytes: bytes.length, gzip: gzipSync(bytes).length };
  });
  const index = readFileSync(join(REPO, "ui/dist/index.html"), "utf8");
  const initial = files.filter((f) => index.includes(f.file));
  const sum = (fs, k) => fs.reduce((s, f) => s + f[k], 0);
  console.log(
    JSON.stringify({
      vms: COUNT,
      rounds: ROUNDS,
      first_render_ms: { p50: Math.round(times[Math.floor(times.length / 2)]), min: Math.round(times[0]), max: Math.round(times[times.length - 1]) },
      initial_bundle: { bytes: sum(initial, "bytes"), gzip: sum(initial, "gzip") },
      all_assets: { bytes: sum(files, "bytes"), gzip: sum(files, "gzip") },
      lazy_chunks: files.filter((f) => !initial.includes(f)).map((f) => `${f.file} ${f.gzip} B gzip`),
    }),
  );
} finally {
  await stopFlotilla(flotilla);
}
