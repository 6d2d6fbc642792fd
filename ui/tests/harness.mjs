// What the browser suite needs: a real `flotilla up` (server, controllers and an agent on
// libvirt, real QEMU guests), the API from Node with the server's CA, and Debian's Chromium
// driven by playwright-core (no browser download).

import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, chmodSync, readFileSync, existsSync, mkdirSync, openSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import https from "node:https";
import net from "node:net";
import { chromium } from "playwright-core";

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
export const SCREENSHOTS = process.env.FLOTILLA_SCREENSHOTS ?? join(REPO, "target/ui-screenshots");

export const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
];

export async function freePort() {
  return new Promise((ok) => {
    const s = net.createServer();
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });
}

/** The tiny guest's kernel and initramfs (scripts/build-tiny-guest.sh builds them once). */
export function tinyGuest() {
  execFileSync(join(REPO, "scripts/build-tiny-guest.sh"), { stdio: "inherit" });
  return join(REPO, "target/guests/tiny");
}

/** `flotilla up` in a fresh data directory; `agent: false` runs `flotilla server` alone. */
export async function startFlotilla({ agent = true, port: chosen, extra = [] } = {}) {
  const bin = process.env.FLOTILLA_BIN ?? join(REPO, "target/debug/flotilla");
  if (!existsSync(bin)) throw new Error(`no flotilla binary at ${bin}: cargo build -p flotilla (or set FLOTILLA_BIN)`);
  const dir = mkdtempSync(join(tmpdir(), "flotilla-ui-"));
  chmodSync(dir, 0o711); // QEMU (another user) reaches the VMs' files through it.
  const port = chosen ?? (await freePort());
  const tag = Math.random().toString(16).slice(2, 6);
  const node = `ui-${tag}`;
  const args = agent
    ? ["up", "--data-dir", dir, "--listen", `127.0.0.1:${port}`, "--node-name", node, "--virt-type", "qemu", "--cpu-overcommit", "32", "--ui-dir", join(REPO, "ui/dist")]
    : ["server", "--data-dir", dir, "--listen", `127.0.0.1:${port}`, "--ui-dir", join(REPO, "ui/dist")];
  args.push(...extra);
  const log = openSync(join(dir, "flotilla.log"), "a");
  const child = spawn(bin, args, { stdio: ["ignore", log, log] });
  const url = `https://127.0.0.1:${port}`;
  const adminYaml = join(dir, "admin.yaml");
  const deadline = Date.now() + 60_000;
  let token;
  let ca;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`flotilla exited (${child.exitCode}); see ${dir}/flotilla.log`);
    if (existsSync(adminYaml)) {
      const text = readFileSync(adminYaml, "utf8");
      token = /^\s*token: *"?([^"\s]+)"?/m.exec(text)?.[1];
      ca = readFileSync(join(dir, "pki/ca.crt"), "utf8");
      try {
        await call({ url, ca, token }, "GET", "/version");
        break;
      } catch {
        /* not serving yet */
      }
    }
    if (Date.now() > deadline) throw new Error(`flotilla did not come up; see ${dir}/flotilla.log`);
    await new Promise((r) => setTimeout(r, 200));
  }
  const flotilla = { url, ca, token, dir, node, tag, child };
  if (agent) {
    await eventually("the node is Ready", 60, async () => {
      const n = await call(flotilla, "GET", `/apis/flotilla.dev/v1alpha1/nodes/${node}`).catch(() => null);
      return n?.status?.conditions?.some((c) => c.type === "Ready" && c.status === "True");
    });
  }
  return flotilla;
}

/** Stops flotilla and removes the domains it made (a failed test leaves nothing running). */
export async function stopFlotilla(flotilla) {
  if (!flotilla) return;
  flotilla.child.kill("SIGTERM");
  await new Promise((r) => setTimeout(r, 500));
  flotilla.child.kill("SIGKILL");
  const names = execFileSync("virsh", ["-c", "qemu:///system", "list", "--all", "--name"], { encoding: "utf8" })
    .split("\n")
    .filter((n) => n.includes(`_${flotilla.tag}-`));
  for (const n of names) {
    try {
      execFileSync("virsh", ["-c", "qemu:///system", "destroy", n], { stdio: "ignore" });
    } catch {}
    try {
      execFileSync("virsh", ["-c", "qemu:///system", "undefine", n, "--nvram"], { stdio: "ignore" });
    } catch {}
  }
}

/** One API request from Node (trusting only the server's CA); the parsed answer. */
export function call({ url, ca, token }, method, path, body) {
  return new Promise((ok, fail) => {
    const req = https.request(
      `${url}${path}`,
      {
        method,
        ca,
        headers: {
          ...(token ? { Authorization: `Bearer ${token}` } : {}),
          ...(body ? { "Content-Type": method === "PATCH" ? "application/merge-patch+json" : "application/json" } : {}),
        },
      },
      (res) => {
        let text = "";
        res.on("data", (c) => (text += c));
        res.on("end", () => {
          let value;
          try {
            value = JSON.parse(text);
          } catch {
            value = text;
          }
          if (res.statusCode >= 300) fail(Object.assign(new Error(`${method} ${path}: ${res.statusCode} ${text}`), { code: res.statusCode, value }));
          else ok(value);
        });
      },
    );
    req.on("error", fail);
    if (body) req.write(JSON.stringify(body));
    req.end();
  });
}

export async function eventually(what, seconds, check) {
  const deadline = Date.now() + seconds * 1000;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${seconds}s waiting until ${what}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

export async function browser() {
  return chromium.launch({ executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium", args: CHROMIUM_ARGS });
}

/** A page signed in with `token` (pasted on the login page, as a person does). */
export async function signedIn(b, flotilla, token = flotilla.token) {
  const context = await b.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  await page.goto(`${flotilla.url}/ui/`);
  await page.getByLabel("Token").fill(token);
  await page.getByRole("button", { name: "Sign in with a token" }).click();
  await page.getByRole("heading", { name: "Virtual machines" }).waitFor();
  return page;
}

export async function screenshot(page, name) {
  mkdirSync(SCREENSHOTS, { recursive: true });
  await page.screenshot({ path: join(SCREENSHOTS, `${name}.png`) });
}
